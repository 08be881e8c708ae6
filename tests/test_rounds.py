"""The round driver on the tiny student: two rounds end to end, manifests, resume, the table and plot."""
from __future__ import annotations

import json

from conftest import run_script


def driver_argv(student, data_dir, workdir, *extra):
    return ["run_rounds.py", "--task", "wordmath", "--data_dir", str(data_dir), "--student", str(student),
            "--workdir", str(workdir), "--rounds", "2", "--exam_limit", "24", "--num_return_sequences", "2",
            "--exam_max_new_tokens", "64", "--epoch", "1", "--train_bsz", "4", "--lr", "1e-3", "--cl_p", "0.1",
            "--warmup_steps", "2", "--eval_limit", "12", *extra]


def test_two_rounds_end_to_end_then_resume_skips_everything(tiny_student, data_dir, tmp_path):
    workdir = tmp_path / "runs"
    result = run_script(*driver_argv(tiny_student, data_dir, workdir, "--arms", "reflect"), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    # --jobs 2 (the CPU default): round 0's evaluations run beside the arm, whose stages keep their order
    commands = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    round0 = [c for c in commands if f"--checkpoint {tiny_student} " in c + " " and "infer.py" in c.split()[2]]
    assert len(round0) == 2 and "--test_on validation" in round0[0] + round0[1] and "--test_on test" in round0[0] + round0[1]
    chain = [c for c in commands if c not in round0]
    assert [c.split()[2] for c in chain] == [
        "infer_student_wrong.py", "query_teacher.py", "run_trainer.py", "infer.py", "infer.py",  # round 1
        "infer_student_wrong.py", "query_teacher.py", "run_trainer.py", "infer.py", "infer.py"]  # round 2
    assert "--mode annotate" in chain[1] and "--mode feedback" in chain[6]
    assert "--contrastive yes" in chain[2] and "--cl_neg_form gold" in chain[2]
    assert result.stdout.count("done in ") == len(commands)  # side by side: one line as each stage ends

    first = json.loads((workdir / "reflect" / "round1" / "manifest.json").read_text())
    second = json.loads((workdir / "reflect" / "round2" / "manifest.json").read_text())
    assert first["start_checkpoint"] == str(tiny_student)
    assert second["start_checkpoint"] == first["checkpoint"] == str(workdir / "reflect" / "round1" / "train" / "final")
    assert second["teacher"]["template_hash"] and second["teacher"]["model"]
    assert second["exam"]["student_wrong"].endswith("reflect/round2/exam/student_wrong.json")
    # keep_previous_data: round 2 trains on round 1's teacher data too
    merged = json.loads((workdir / "reflect" / "round2" / "train_teacher_data.json").read_text())
    round1_data = json.loads((workdir / "round1" / "teacher" / "teacher_data.json").read_text())
    assert set(round1_data) <= set(merged)
    for manifest in (first, second):
        for split in ("validation", "test"):
            assert 0 <= manifest["eval"][split]["acc"] <= 1 and manifest["eval"][split]["total"] == 12
        assert manifest["seconds"] > 0
    rows = json.loads((workdir / "rounds.json").read_text())
    assert [row["round"] for row in rows["arms"]["reflect"]] == [1, 2] and rows["student"]["round"] == 0
    assert (workdir / "rounds.png").stat().st_size > 1000
    table = result.stdout[result.stdout.index("round  arm"):]
    assert len([line for line in table.splitlines() if line.strip()[:1].isdigit()]) == 3

    again = run_script(*driver_argv(tiny_student, data_dir, workdir, "--arms", "reflect", "--jobs", "1"), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("$ ")]  # every stage skipped
    assert json.loads((workdir / "rounds.json").read_text()) == rows


def test_start_round_needs_earlier_manifests(tiny_student, data_dir, tmp_path):
    result = run_script(*driver_argv(tiny_student, data_dir, tmp_path / "empty", "--start_round", "2", "--arms", "reflect"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --start_round")


def test_rounds_with_the_openai_backend_against_a_local_server(tiny_student, data_dir, tmp_path):
    """The same stages, the teacher reached through the real openai client on 127.0.0.1 (with faults)."""
    from fake_openai_server import FakeOpenAIServer

    secret = "sk-test-rounds-0123456789abcdef"
    with FakeOpenAIServer() as server:
        server.inject("429", "500", "malformed")
        workdir = tmp_path / "runs"
        result = run_script(*driver_argv(tiny_student, data_dir, workdir, "--backend", "openai", "--arms", "reflect",
                                         "--eval_splits", "test",
                                         "--base_url", server.url, "--teacher_model", "fake-teacher"),
                            env={"OPENAI_API_KEY": secret}, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert server.completed > 0 and all(h == f"Bearer {secret}" for h in server.auth_headers)
    second = json.loads((workdir / "reflect" / "round2" / "manifest.json").read_text())
    assert second["teacher"]["model"] == "fake-teacher" and second["teacher"]["kept"] > 0
    assert "--backend openai" in result.stdout
    written = [p for p in workdir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".txt")]
    assert written and not any(secret in p.read_text(errors="ignore") for p in written)
    assert secret not in result.stdout + result.stderr


def test_stage_commands_parse_back_into_each_scripts_arguments(tmp_path):
    """The driver writes each stage's command from that script's own dataclass: every value it means
    to pass arrives, under the original's short flags, and a wrong name fails before anything runs."""
    import pytest

    from args import ExamArguments, InferArguments, TeacherArguments, TrainArguments
    from driver_args import RoundsArguments
    from flags import parse
    from rounds import RoundDriver

    driver = RoundDriver(parse(RoundsArguments, [
        "--workdir", str(tmp_path), "--lr", "3e-4", "--train_bsz", "8", "--epoch", "2", "--fewshot", "yes",
        "--cl_p", "0.3", "--deepspeed", "ds_stage3_config.json", "--valid_size", "7", "--seed", "5", "--lora_r", "8",
        "--lora_alpha", "32", "--lora_dropout", "0.1", "--lora_targets", "q_proj,v_proj"]))
    argv = driver.train_command("ck", "t.json", "n.json", tmp_path / "train", True)
    assert argv[1] == "run_trainer.py" and "--lr" in argv and "--learning_rate" not in argv
    train = parse(TrainArguments, argv[2:])
    assert (train.learning_rate, train.per_device_train_batch_size, train.num_train_epochs, train.cl_p, train.fewshot,
            train.deepspeed, train.contrastive, train.checkpoint, train.valid_size, train.seed, train.resume,
            train.max_grad_norm, train.lr_scheduler_type, train.cl_neg_form) == \
        (3e-4, 8, 2, 0.3, True, "ds_stage3_config.json", True, "ck", 7, 5, "yes", 1.0, "constant_with_warmup", "gold")
    assert (train.lora_r, train.lora_alpha, train.lora_dropout, train.lora_targets) == (8, 32, 0.1, "q_proj,v_proj")
    default = parse(TrainArguments, RoundDriver(parse(RoundsArguments, ["--workdir", str(tmp_path)])).train_command(
        "ck", "t.json", "n.json", tmp_path / "train", False)[2:])
    assert (default.lora_r, default.lora_alpha, default.lora_dropout, default.lora_targets) == (0, 16, 0.05, "auto")
    exam = parse(ExamArguments, driver.exam_command("ck", tmp_path / "exam")[2:])
    assert (exam.num_return_sequences, exam.limit, exam.max_new_tokens, exam.batch, exam.test_on, exam.rationale) == \
        (4, 200, 160, 50, "train", True)
    evaluation = parse(InferArguments, driver.eval_command("ck", tmp_path / "eval", "validation")[2:])
    assert (evaluation.test_on, evaluation.batch, evaluation.limit, evaluation.valid_size) == ("validation", 200, 200, 7)
    every = RoundDriver(parse(RoundsArguments, ["--workdir", str(tmp_path), "--eval_limit", "0", "--exam_limit", "0"]))
    assert parse(InferArguments, every.eval_command("ck", tmp_path / "e", "test")[2:]).limit is None  # 0: every item
    assert parse(ExamArguments, every.exam_command("ck", tmp_path / "x")[2:]).limit is None
    annotate = parse(TeacherArguments, driver.teacher_command("annotate", tmp_path / "t", None,
                                                              limit=driver.args.annotate_limit)[2:])
    assert annotate.limit == 400
    teacher = parse(TeacherArguments, driver.teacher_command("feedback", tmp_path / "t", "w.json")[2:])
    assert (teacher.mode, teacher.student_wrong, teacher.num_samples, teacher.backend, teacher.seed) == \
        ("feedback", "w.json", 2, "offline", 5)
    with pytest.raises(TypeError):
        driver.command("run_trainer.py", TrainArguments, epoch=3)  # the old name of num_train_epochs
