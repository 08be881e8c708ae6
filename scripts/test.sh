#!/usr/bin/env bash
# Run the test suite in the local virtual environment (created and filled on first use).
# the vLLM engine's tests run in its own environment (requirements-vllm.txt, .venv-vllm): built here too, so that
# they run rather than skip (LTR_REQUIRE_VLLM=1 makes a missing one a failure)
bash "$(dirname "$0")/env.sh" --vllm
export LTR_VLLM_PYTHON="$(cd "$(dirname "$0")/.." && pwd)/.venv-vllm/bin/python" LTR_REQUIRE_VLLM=1
. "$(dirname "$0")/env.sh"
# one worker per core (pytest-xdist), a test file per worker at a time: module fixtures are built once;
# files in collection order (the slowest first, tests/conftest.py SLOW_FILES) rather than by test count
python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests "$@"
