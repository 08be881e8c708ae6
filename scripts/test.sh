#!/usr/bin/env bash
# Run the test suite in the local virtual environment (created and filled on first use).
. "$(dirname "$0")/env.sh"
# one worker per core (pytest-xdist), a test file per worker at a time: module fixtures are built once;
# files in collection order (the slowest first, tests/conftest.py SLOW_FILES) rather than by test count
python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests "$@"
