#!/usr/bin/env bash
# Run the test suite in the local virtual environment (created and filled on first use).
. "$(dirname "$0")/env.sh"
python -m pytest -q tests "$@"
