"""run_trainer.py end to end: the README command under ZeRO-3 on CPU, 2 processes over gloo,
resume after a kill, and bad inputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from tasks import load_split


def readme_command(student: Path, data_dir: Path, teacher: Path, negatives: Path, out: Path, *extra: str) -> list[str]:
    """The original README's training command; only model, files, device, length and precision adapted."""
    return ["run_trainer.py", "--device", "cpu", "--task", "wordmath", "--data_dir", str(data_dir),
            "--load", str(student), "--save_best", "0", "--epoch", "10", "--teacher_data", str(teacher),
            "--fewshot", "yes", "--train_bsz", "2", "--fp16", "no", "--contrastive", "yes",
            "--cl_pos_path", str(teacher), "--cl_neg_path", str(negatives), "--cl_ratio", "0.5",
            "--merge_losses", "yes", "--do_eval", "yes", "--weight_decay", "0.01", "--lr", "7e-6",
            "--deepspeed", "ds_stage3_config.json", "--output_dir", str(out), *extra]


def test_readme_command_trains_under_zero3_and_infer_scores_the_checkpoint(tiny_student, data_dir, teacher_files,
                                                                            tmp_path):
    out = tmp_path / "run"
    result = run_script(*readme_command(tiny_student, data_dir, *teacher_files, out, "--max_steps", "3",
                                        "--eval_limit", "6", "--logging_steps", "1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rationales_wrong_answer" not in result.stdout  # the file is used as given, as the original did
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert not list(final.glob("*.bin"))
    saved_args = json.loads((final / "run_args.json").read_text())
    assert saved_args["deepspeed"] == "ds_stage3_config.json" and saved_args["contrastive"] is True
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "ds_config.json").is_file() and (checkpoint / "run_args.json").is_file()
    assert list(checkpoint.glob("global_step3/*optim_states.pt"))  # ZeRO-3 shards, for --resume
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "lm_loss" in e]
    assert logged and all(0 <= e["triplet_fraction"] <= 1 and e["cl_loss"] >= 0 for e in logged)
    assert any("eval_accuracy" in e for e in state["log_history"])
    evaluated = json.loads(next((out / "eval").glob("step*.json")).read_text())
    validation = {ex.question for ex in load_split("wordmath", "validation", str(data_dir))}
    assert {r["question"] for r in evaluated["records"]} <= validation  # selection reads validation, never test
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["rows"] == 180  # the +1 (wrong-answer) rationales included
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard by default

    evaluation = run_script("infer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--fewshot",
                            "--rationale", "--checkpoint", str(final), "--limit", "8", "--output_dir",
                            str(tmp_path / "eval"))
    assert evaluation.returncode == 0, evaluation.stderr
    scored = json.loads(next((tmp_path / "eval").glob("Acc*.json")).read_text())
    assert scored["total"] == 8 and len(scored["results"]) == 8


def test_two_process_zero3_over_gloo_trains_and_evaluates(tiny_student, data_dir, teacher_files, tmp_path):
    out = tmp_path / "run2"
    result = run_script(*readme_command(tiny_student, data_dir, *teacher_files, out, "--max_steps", "2",
                                        "--eval_limit", "5", "--fewshot", "yes"), "--device", "0,1", timeout=900)
    # few-shot: the evaluation's shared-demos cache under ZeRO-3, whose ranks step on until the slowest is done
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "nproc_per_node 2" in result.stdout
    shards = list((out / "checkpoint-2" / "global_step2").glob("*zero_pp_rank_*_model_states.pt"))
    assert len(shards) == 2
    assert (out / "final" / "model.safetensors").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval"] and summary["eval"][0]["total"] == 5


def plain_command(student, data_dir, teacher, negatives, out, *extra):
    return [sys.executable, "run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load",
            str(student), "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
            "--cl_neg_path", str(negatives), "--train_bsz", "4", "--lr", "1e-3", "--warmup_steps", "2",
            "--output_dir", str(out), *extra]


def test_killed_run_resumes_from_its_last_checkpoint(tiny_student, data_dir, teacher_files, tmp_path):
    out = tmp_path / "run3"
    argv = plain_command(tiny_student, data_dir, *teacher_files, out, "--logging_steps", "1", "--epoch", "40",
                         "--resume", "yes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    assert saved, "no checkpoint before the kill"
    assert not (out / "final").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(argv[:argv.index("--epoch")] + ["--epoch", "3", "--resume", "yes"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{saved[-1]}'}" in resumed.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    steps_per_epoch = saved[0]  # the first checkpoint is written at the end of epoch 1
    assert summary["steps"] == 3 * steps_per_epoch
    # the mean loss covers the whole run, the steps before the kill included (every step is logged)
    history = json.loads((out / f"checkpoint-{summary['steps']}" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e and "train_loss" not in e]
    assert len(losses) == summary["steps"] and summary["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-3)


def test_merge_losses_no_runs_two_backward_passes(tiny_student, data_dir, teacher_files, tmp_path):
    out = tmp_path / "run4"
    result = subprocess.run(plain_command(tiny_student, data_dir, *teacher_files, out, "--max_steps", "2",
                                          "--merge_losses", "no", "--logging_steps", "1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("cl_loss" in e and "lm_loss" in e for e in state["log_history"])


@pytest.mark.parametrize("case", ["not_object", "nothing_left", "contrastive_without_paths", "unknown_mle",
                                  "missing_teacher_file"])
def test_bad_training_inputs_give_one_clear_line(case, tiny_student, data_dir, teacher_files, tmp_path):
    teacher, negatives = teacher_files
    bad = tmp_path / "bad.json"
    extra: list[str] = []
    if case == "not_object":
        bad.write_text(json.dumps([["a question", "a rationale"]]))
        teacher = bad
    elif case == "nothing_left":
        bad.write_text(json.dumps({q: [t[-1]] for q, t in json.loads(teacher.read_text()).items()}))  # all wrong
        teacher = bad
        extra = ["--answer_filter", "yes"]
    elif case == "unknown_mle":
        extra = ["--mle", "sometimes"]
    elif case == "missing_teacher_file":
        teacher = tmp_path / "nowhere.json"
    out = tmp_path / "out"
    argv = plain_command(tiny_student, data_dir, teacher, negatives, out, "--max_steps", "1", *extra)
    if case == "contrastive_without_paths":
        argv = argv[:argv.index("--cl_pos_path")] + argv[argv.index("--train_bsz"):]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


def test_save_best_keeps_the_most_accurate_epoch_and_the_latest(tiny_student, data_dir, teacher_files, tmp_path):
    out = tmp_path / "run5"
    result = subprocess.run(plain_command(tiny_student, data_dir, *teacher_files, out, "--epoch", "3", "--do_eval",
                                          "yes", "--eval_limit", "6", "--save_best", "1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert len(summary["eval"]) == 3
    best = json.loads((out / "best_checkpoint.json").read_text())
    assert best["eval_accuracy"] == max(e["acc"] for e in summary["eval"])
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    latest = f"checkpoint-{summary['steps']}"
    assert set(kept) == {best["checkpoint"], latest}
