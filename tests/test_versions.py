"""The transformers range hf_compat declares is tested at both ends: the suite itself runs on the pin (the
top), and here the tests that touch transformers internals run again on the bottom, installed beside the
project's packages (pip --target, first PYTHONPATH entry) so nothing else changes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_compat

ROOT = Path(__file__).resolve().parents[1]
# checkpointing with caches, the prefix cache in generation, compiled layers, the shared step's paths
SENSITIVE = ["tests/test_prefix_cache.py", "tests/test_compile.py", "tests/test_losses.py",
             "tests/test_switches.py::test_checkpointing_and_chunked_loss_keep_values_and_gradients",
             "tests/test_switches.py::test_compiled_layers_keep_values_and_stop_recompiling"]


def test_version_line_names_the_version_and_the_range():
    assert hf_compat.version_line("5.20.1") == f"transformers 5.20.1 (tested {hf_compat.LOWEST} to {hf_compat.HIGHEST})"
    assert hf_compat.version_line("6.0.0").endswith("outside the tested range, results unverified")
    assert not hf_compat.supported("5.16.2") and hf_compat.supported(hf_compat.LOWEST)
    assert hf_compat.supported(), f"the pinned transformers {hf_compat.installed()} is outside {hf_compat.HIGHEST}"
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("transformers=="))
    assert pin == f"transformers=={hf_compat.HIGHEST}"


@pytest.mark.skipif(os.environ.get("L2R_LOWEST_TRANSFORMERS") == "1", reason="already the run on the lowest version")
def test_version_sensitive_tests_pass_on_the_lowest_transformers():
    overlay = Path(os.environ.get("L2R_CACHE", Path.home() / ".cache" / "learn-to-reason")) / f"transformers-{hf_compat.LOWEST}"
    if not (overlay / "transformers").is_dir():
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(overlay),
                                  *hf_compat.LOWEST_PINS], capture_output=True, text=True, timeout=600)
        if install.returncode:
            pytest.skip(f"could not install transformers {hf_compat.LOWEST} (no package index?): {install.stderr[-300:]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(overlay), str(ROOT)]), L2R_LOWEST_TRANSFORMERS="1",
               HF_HUB_OFFLINE="1")
    found = subprocess.run([sys.executable, "-c", "import hf_compat; print(hf_compat.version_line())"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert found.stdout.startswith(f"transformers {hf_compat.LOWEST} (tested"), found.stdout + found.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SENSITIVE], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:]
