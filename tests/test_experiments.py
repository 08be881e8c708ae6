"""experiments/self_reflection.py: the controlled-runs harness, on the tiny student with tiny settings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_script


def sweep_argv(student, data_dir, teacher, negatives, workdir) -> list[str]:
    return ["experiments/self_reflection.py", "--student", str(student), "--data_dir", str(data_dir),
            "--teacher_data", str(teacher), "--negatives", str(negatives), "--workdir", str(workdir),
            "--arms", "lm,gold-detached", "--seeds", "1,2", "--eval_limit", "6", "--bootstrap", "200",
            "--train_flags", "--max_steps 2 --train_bsz 4 --warmup_steps 1", "--jobs", "2", "--threads", "1"]


def test_sweep_table_matches_results_json_and_rerun_skips(tiny_student, data_dir, teacher_files, tmp_path):
    workdir = tmp_path / "sweep"
    result = run_script(*sweep_argv(tiny_student, data_dir, *teacher_files, workdir), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    saved = json.loads((workdir / "results.json").read_text())
    assert len(saved["runs"]) == 4 and {r["arm"] for r in saved["runs"]} == {"lm", "gold-detached"}
    trains = [line for line in result.stdout.splitlines() if line.startswith("$ ") and "run_trainer.py" in line]
    assert len(trains) == 4 and all("--seed" in t for t in trains)
    assert sum("--contrastive no" in t for t in trains) == 2
    rows = {row["arm"]: row for row in saved["summary"]["rows"]}
    for arm, row in rows.items():
        for split in ("validation", "test"):
            per_seed = [r[split]["acc"] for r in saved["runs"] if r["arm"] == arm]
            assert row[split]["mean"] == pytest.approx(np.mean(per_seed))
            assert f"{row[split]['mean']:.4f}" in result.stdout
    diff = rows["gold-detached"]["validation"]["diff_vs_reference"]
    assert diff["low"] <= diff["mean"] <= diff["high"]
    paired = np.mean([np.mean(a["validation"]["correct"]) - np.mean(b["validation"]["correct"])
                      for a in saved["runs"] if a["arm"] == "gold-detached"
                      for b in saved["runs"] if b["arm"] == "lm" and b["seed"] == a["seed"]])
    assert diff["mean"] == pytest.approx(paired)
    again = run_script(*sweep_argv(tiny_student, data_dir, *teacher_files, workdir), timeout=300)
    assert again.returncode == 0 and not [line for line in again.stdout.splitlines() if line.startswith("$ ")]


def test_paired_interval_covers_a_known_difference():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from self_reflection import paired_interval

    rng = np.random.default_rng(1)
    ref = (rng.random((4, 2000)) < 0.5).astype(int)
    better = np.where(rng.random((4, 2000)) < 0.1, 1, ref)  # flips ~5% of answers to right
    mean, low, high = paired_interval(better, ref, 500, np.random.default_rng(0))
    assert mean == pytest.approx((better - ref).mean()) and 0.03 < low < mean < high < 0.07
    same_mean, same_low, same_high = paired_interval(ref, ref, 100, np.random.default_rng(0))
    assert same_mean == same_low == same_high == 0
