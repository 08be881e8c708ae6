"""The embedded default: data preparation (idempotent, disjoint splits) and the student build."""
from __future__ import annotations

import json
import re

import pytest

import wordmath
from conftest import run_script


def test_prepare_data_is_idempotent_and_splits_are_disjoint(tmp_path):
    argv = ["prepare_data.py", "--data_dir", str(tmp_path), "--train_size", "200", "--test_size", "50",
            "--valid_size", "60"]
    first = run_script(*argv)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("written") == 6
    files = {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")}
    assert len(files) == 6
    second = run_script(*argv)
    assert second.returncode == 0 and second.stdout.count("up to date") == 6
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")} == files
    for task in ("wordmath", "gsm_symbolic"):
        rows = {split: [json.loads(line) for line in (tmp_path / task / f"{split}.jsonl").read_text().splitlines()]
                for split in ("train", "validation", "test")}
        assert [len(rows[s]) for s in ("train", "validation", "test")] == [200, 60, 50]
        questions = {split: {r["question"] for r in split_rows} for split, split_rows in rows.items()}
        assert not questions["train"] & questions["test"]
        assert not questions["validation"] & (questions["train"] | questions["test"])
        assert all(re.search(r"\n#### -?[\d.]+$", r["answer"]) for split_rows in rows.values() for r in split_rows)


def test_prepare_data_rejects_bad_flags(tmp_path):
    result = run_script("prepare_data.py", "--data_dir", str(tmp_path), "--task", "gsm9k")
    assert result.returncode == 2 and result.stderr.startswith("error: --task")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("difficulty", [wordmath.Difficulty(), wordmath.Difficulty(min_steps=3, max_steps=4, max_start=9)])
def test_wordmath_solutions_are_correct_step_by_step(difficulty):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for row in wordmath.generate(200, seed=5, d=difficulty):
        steps = re.findall(r"(\d+) ([+\-*]) (\d+) = (\d+)", row["answer"])
        assert difficulty.min_steps <= len(steps) <= difficulty.max_steps
        assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps)
        assert row["answer"].endswith(f"#### {steps[-1][3]}")
        assert int(re.search(r"has (\d+)", row["question"]).group(1)) <= difficulty.max_start


def test_built_student_loads_like_a_hub_model(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    result = run_script("build_student.py", "--data_dir", str(data_dir), "--out", str(out), "--warm_steps", "3",
                        "--n_layer", "1", "--n_embd", "32")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gptj" and model.config.n_layer == 1
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("He has 1234 apples")["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "3", "4"]  # one token per digit
    again = run_script("build_student.py", "--data_dir", str(data_dir), "--out", str(out), "--warm_steps", "3",
                       "--n_layer", "1", "--n_embd", "32")
    assert "already built" in again.stdout
