#!/usr/bin/env bash
# The embedded demo, fully offline on CPU: prepare data -> build the round-0 student -> 2 rounds of
# exam / teacher / training / evaluation, then a per-round table and plot in runs/demo/.
. "$(dirname "$0")/env.sh"
python run_rounds.py "$@"
