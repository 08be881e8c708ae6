"""Which transformers this project runs on.

The code reaches into transformers internals (cache layers, checkpointed layers, the attention interface)
that change between minor versions, so it states the range the test suite covers: the pin in
requirements.txt is the top, and tests/test_versions.py runs the version-sensitive tests against the bottom.
Outside the range a run still starts, with a note (a newer transformers usually works; say which failed)."""
from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

LOWEST = "5.17.0"   # the GPU images available for benchmarks ship this one
HIGHEST = "5.24.0"  # requirements.txt
# What tests/test_versions.py installs beside the project's packages to run on LOWEST
# (transformers 5.17 needs huggingface_hub 1.x, which needs httpx).
LOWEST_PINS = (f"transformers=={LOWEST}", "huggingface_hub==1.33.0", "httpx==0.29.0", "httpcore==1.0.9", "h11==0.16.0",
               "anyio==4.16.0", "idna", "certifi", "typing_extensions")


def installed() -> str:
    return version("transformers")


def supported(found: str | None = None) -> bool:
    return Version(LOWEST) <= Version(found or installed()) <= Version(HIGHEST)


def version_line(found: str | None = None) -> str:
    """One line for logs and results: the version that ran, and whether the suite covers it."""
    found = found or installed()
    note = "" if supported(found) else " -- outside the tested range, results unverified"
    return f"transformers {found} (tested {LOWEST} to {HIGHEST}){note}"


def checkpoint_inside_compiled_layer() -> bool:
    """Whether a compiled checkpointed layer replays inside its compiled region (transformers 5.2x: the layer's
    `forward_with_checkpointing`). Before, the replay in backward runs the compiled layer again outside the
    forward's hooks, where each layer reads its cache by index: one graph per layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # 5.2x wraps every subclass's forward (in __init_subclass__) so the checkpoint call is part of the forward
    return "__init_subclass__" in vars(GradientCheckpointingLayer)
