"""bench/bench_gpu_step.py in its smoke mode (tiny Llama on CPU): every variant and switch set runs, and
run_trainer.py's steady state is read back. A smoke check of the benchmark's code, not a measurement."""
from __future__ import annotations

import json

from conftest import run_script


def test_gpu_step_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench/bench_gpu_step.py", "--smoke", "--sets", "plain,fast", "--warmup", "1", "--steps", "1",
                        "--trainer_steps", "3", "--workdir", str(tmp_path / "work"), "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("plain", "fast"):
        for variant in ("stock", "lm", "shared", "five"):
            measured = results["sets"][name][variant]
            assert measured["tokens_per_s"] > 0, (name, variant)
            # the shared step trains the text plus the triplet rows' anchor, positive and negative
            assert (measured["trained_tokens_per_s"] > measured["tokens_per_s"]) == (variant in ("shared", "five"))
        assert results["sets"][name]["graphs"]["graph_breaks"] == 0
    assert results["trainer"]["fast"]["tokens_per_s"] > 0
    assert results["versions"]["transformers"] and "MFU trained" in result.stdout
    assert "LM-only / stock step" in result.stdout and "run_trainer.py / bare shared step" in result.stdout
