"""Failures partway through a run, injected: a damaged newest checkpoint, two training runs into one folder, a
killed lock holder, and a full disk while writing the Acc file, the teacher journal or a checkpoint. Each ends in
one `error:` line naming the path (or a note saying what was skipped), leaves no file a later run would trust, and
a re-run continues."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import common
import infer
import query_teacher
import run_rounds
import run_trainer
from common import DiskFull, UserError, atomic_write_json, lock_folder
from conftest import ROOT
from teacher_journal import Journal
from train_setup import checkpoint_damage, checkpoint_to_resume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def run_main(module, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A script's main in-process, as the command line calls it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = 0
    try:
        module.main()
    except SystemExit as stop:
        code = stop.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# ---------------------------------------------------------------- damaged checkpoints (resume)

def make_checkpoint(folder: Path, state: str | None = '{"global_step": 1}', weights: str = "whole") -> Path:
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    if weights in ("whole", "truncated"):
        save_file({"w": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
        if weights == "truncated":
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[:len(data) // 3])
    elif weights == "deepspeed":
        (folder / "global_step1").mkdir()
    return folder


@pytest.mark.parametrize("state, weights, reason", [
    ('{"global_step": 1}', "whole", None),
    ('{"global_step": 1}', "deepspeed", None),
    (None, "whole", "no trainer_state.json"),
    ("", "whole", "empty or not JSON"),
    ('{"global_step": ', "whole", "empty or not JSON"),
    ('{"global_step": 1}', "none", "no weights"),
    ('{"global_step": 1}', "truncated", "model.safetensors cannot be read"),
])
def test_checkpoint_damage_says_why(state, weights, reason, tmp_path):
    damage = checkpoint_damage(make_checkpoint(tmp_path / "checkpoint-1", state, weights))
    assert damage is None if reason is None else reason in damage


def test_resume_falls_back_past_damaged_newest_checkpoints(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint-10")
    make_checkpoint(tmp_path / "checkpoint-20", state="")
    make_checkpoint(tmp_path / "checkpoint-30", weights="truncated")
    make_checkpoint(tmp_path / "checkpoint-5")
    resume = checkpoint_to_resume(SimpleNamespace(resume_requested=True), str(tmp_path), None)
    assert resume == str(tmp_path / "checkpoint-10")
    out = capsys.readouterr().out
    assert f"skipping {tmp_path / 'checkpoint-30'} (its model.safetensors cannot be read)" in out
    assert f"skipping {tmp_path / 'checkpoint-20'} (its trainer_state.json is empty or not JSON)" in out
    assert f"resuming from {tmp_path / 'checkpoint-10'}" in out


def test_resume_with_only_damaged_checkpoints_starts_over(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint-3", state="")
    assert checkpoint_to_resume(SimpleNamespace(resume_requested=True), str(tmp_path), None) is None
    assert "no usable checkpoint" in capsys.readouterr().out


def training_argv(tiny_student, data_dir, teacher_files, out: Path, *extra: str) -> list[str]:
    teacher, negatives = teacher_files
    return ["--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student), "--teacher_data",
            str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher), "--cl_neg_path", str(negatives),
            "--train_bsz", "4", "--lr", "1e-3", "--warmup_steps", "1", "--output_dir", str(out), *extra]


def test_training_resumes_from_the_newest_whole_checkpoint(tiny_student, data_dir, teacher_files, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "run"
    steps = ["--save_strategy", "steps", "--save_steps", "2", "--resume", "yes"]
    code, _, err = run_main(run_trainer, training_argv(tiny_student, data_dir, teacher_files, out, "--max_steps", "4",
                                                       *steps), monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (out / "checkpoint-4" / "trainer_state.json").write_text("")  # as a kill or a full disk could leave it
    code, stdout, err = run_main(run_trainer, training_argv(tiny_student, data_dir, teacher_files, out, "--max_steps",
                                                            "6", *steps), monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert f"skipping {out / 'checkpoint-4'} (its trainer_state.json is empty or not JSON)" in stdout
    assert f"resuming from {out / 'checkpoint-2'}" in stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6


# ---------------------------------------------------------------- one writer per folder

def test_a_second_training_run_into_a_busy_folder_is_refused(tiny_student, data_dir, teacher_files, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import lock_folder; "
                               f"lock_folder({str(out)!r}, 'training run'); print('locked', flush=True); time.sleep(300)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_main(run_trainer, training_argv(tiny_student, data_dir, teacher_files, out, "--max_steps", "1"),
                                monkeypatch, capsys)
        assert code == 2
        assert f"{out}: another training run is writing there" in one_error_line(err)
        assert not [p for p in out.rglob("*") if p.is_file()]

        holder.send_signal(signal.SIGKILL)  # a killed run leaves no stale lock: the kernel drops it
        holder.wait()
        code, _, err = run_main(run_trainer, training_argv(tiny_student, data_dir, teacher_files, out, "--max_steps", "1"),
                                monkeypatch, capsys)
        assert code == 0, err[-3000:]
        assert (out / "final" / "run_args.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_free_again_after_a_run_and_within_one_process(tmp_path):
    fd = lock_folder(tmp_path, "training run")
    with pytest.raises(UserError, match="another training run is writing there"):
        lock_folder(tmp_path, "training run")
    os.close(fd)
    os.close(lock_folder(tmp_path, "training run"))


# ---------------------------------------------------------------- a full disk

def test_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "Acc12.0000.json"

    def full(fd):
        raise NO_SPACE
    monkeypatch.setattr(common.os, "fsync", full)
    with pytest.raises(DiskFull, match=f"{target}: no space left on device"):
        atomic_write_json(target, {"acc": 12.0})
    assert list(tmp_path.iterdir()) == []


def test_evaluation_on_a_full_disk_is_one_line_and_a_rerun_writes_the_acc_file(tiny_student, data_dir, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "eval"
    argv = ["--load", str(tiny_student), "--data_dir", str(data_dir), "--task", "wordmath", "--test_on", "validation",
            "--limit", "4", "--max_new_tokens", "16", "--output_dir", str(out)]
    real_fsync = common.os.fsync

    def full(fd):
        raise NO_SPACE
    monkeypatch.setattr(common.os, "fsync", full)
    code, _, err = run_main(infer, argv, monkeypatch, capsys)
    assert code == 2 and "no space left on device" in one_error_line(err) and str(out / "Acc") in one_error_line(err)
    assert not list(out.glob("*")) if out.exists() else True
    monkeypatch.setattr(common.os, "fsync", real_fsync)
    code, _, err = run_main(infer, argv, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert len(list(out.glob("Acc*.json"))) == 1


def test_journal_append_on_a_full_disk_cuts_back_to_whole_records(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append({"key": "a", "texts": ["x"]})
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the record
        real_write(fd, data[:len(data) // 2])
        raise NO_SPACE
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match="journal.jsonl: no space left on device"):
        journal.append({"key": "b", "texts": ["y" * 100]})
    monkeypatch.setattr(os, "write", real_write)
    journal.append({"key": "c", "texts": ["z"]})
    journal.close()
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "c"]


def test_teacher_on_a_full_disk_keeps_what_was_journaled_and_a_rerun_continues(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "teacher"
    argv = ["--backend", "offline", "--task", "wordmath", "--data_dir", str(data_dir), "--limit", "8",
            "--output_dir", str(out), "--concurrency", "1"]
    real_append, calls = Journal.append, []

    def fills_up(self, record):
        calls.append(record["key"])
        if len(calls) > 3:
            raise DiskFull(self.path)
        real_append(self, record)
    monkeypatch.setattr(Journal, "append", fills_up)
    code, _, err = run_main(query_teacher, argv, monkeypatch, capsys)
    assert code == 2 and f"{out / 'journal.jsonl'}: no space left on device" in one_error_line(err)
    assert not (out / "teacher_data.json").exists() and not (out / "summary.json").exists()
    assert len((out / "journal.jsonl").read_text().splitlines()) == 3

    monkeypatch.setattr(Journal, "append", real_append)
    code, _, err = run_main(query_teacher, argv, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"]["from_journal"] == 3 and summary["requests"]["new"] == 5


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_resume_skips_the_cut_checkpoint(
        tiny_student, data_dir, teacher_files, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "run"
    argv = training_argv(tiny_student, data_dir, teacher_files, out, "--max_steps", "4", "--save_strategy", "steps",
                         "--save_steps", "2", "--resume", "yes")
    real_save, saves = modeling_utils.safe_save_file, []

    def fills_up(tensors, filename, *args, **kwargs):
        saves.append(filename)
        if len(saves) > 1:  # the second checkpoint: safetensors words it in its own error type
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                               'message: "No space left on device" })')
        return real_save(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(modeling_utils, "safe_save_file", fills_up)
    code, _, err = run_main(run_trainer, argv, monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and f"{out}: no space left on device (while saving a checkpoint)" in line
    assert checkpoint_damage(out / "checkpoint-2") is None and checkpoint_damage(out / "checkpoint-4") is not None

    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
    code, stdout, err = run_main(run_trainer, argv, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert f"skipping {out / 'checkpoint-4'}" in stdout and f"resuming from {out / 'checkpoint-2'}" in stdout
    assert (out / "final" / "run_args.json").is_file()


# ---------------------------------------------------------------- the driver reads what it needs first

@pytest.mark.parametrize("content", ["{", "[]", '{"round": 1}'])
def test_a_damaged_manifest_of_a_skipped_round_stops_the_driver_before_any_stage(content, tiny_student, data_dir,
                                                                                 tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    manifest = work / "lm" / "round1" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(content)
    code, _, err = run_main(run_rounds, ["--task", "wordmath", "--data_dir", str(data_dir), "--student", str(tiny_student),
                                         "--lr", "1e-3", "--cl_p", "0.1", "--workdir", str(work), "--arms", "lm", "--start_round", "2"],
                            monkeypatch, capsys)
    assert code == 2 and str(manifest) in one_error_line(err)
    assert sorted(p for p in work.rglob("*") if p.is_file()) == [manifest]
