"""Fidelity with the original on the training side (issue 11): negatives, optimisation, flags.

Every expected value here is written out from the original's documented behaviour (SPEC §5 and the
issue), on fixtures of our own; the code under test never produces its own expectation."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

import tasks
from args import TrainArguments
from common import UserError
from conftest import ROOT, run_script
from distributed import torchrun_flags
from flags import parse
from losses import LossConfig, clip_self_reflection
from train_data import build_train_data
from train_setup import check_resume, deepspeed_config, sample_teacher_rows, training_arguments
from trainer import WARMUP_LOG, warmup_log_factor

WORDMATH = tasks.get_task("wordmath")
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
# What a cleaned exam answer looks like: reasoning, its own (wrong) answer line, cut right after the answer.
STUDENT_WRONG = "Tom starts with 3 apples.\nHe buys 4, so 3 + 4 = 8.\nAnswer: 8"


def readme_argv(*extra: str) -> list[str]:
    """The original README's training flags (files and model are not read by parsing)."""
    return ["--device", "0,1,2,3,4,5,6,7", "--task", "gsm8k", "--load", "EleutherAI/gpt-j-6B", "--save_best", "0",
            "--epoch", "10", "--teacher_data", "t.json", "--fewshot", "yes", "--train_bsz", "2", "--fp16", "yes",
            "--contrastive", "yes", "--cl_pos_path", "t.json", "--cl_neg_path", "n.json", "--cl_ratio", "0.5",
            "--merge_losses", "yes", "--do_eval", "yes", "--weight_decay", "0.01", "--lr", "7e-6",
            "--deepspeed", "ds_stage3_config.json", *extra]


# ---------------------------------------------------------------- 1. negatives as the original built them

@pytest.fixture(scope="module")
def negative_setup(tmp_path_factory, tiny_student):
    from model_loading import load_tokenizer

    ex = tasks.Example(QUESTION, "7")
    tokenizer = load_tokenizer(str(tiny_student))
    folder = tmp_path_factory.mktemp("negatives")
    teacher = folder / "teacher.json"
    teacher.write_text(json.dumps({QUESTION: ["Tom has 3 + 4 = 7 apples. Therefore, the answer is 7.",
                                              "3 and 4 more make 7. Therefore, the answer is 7."]}))
    negatives = folder / "neg.json"
    negatives.write_text(json.dumps({QUESTION: [STUDENT_WRONG]}))
    return ex, tokenizer, teacher, negatives


@pytest.mark.parametrize("form, expected", [
    # the original: the teacher preprocessing applied to the student's text (newlines to spaces, its
    # own answer line included), then "\nAnswer: <gold>" and eos (the original's space before eos is
    # gone, and the space after "Reasoning:" opens the continuation: README "Fidelity", boundary row)
    ("original", " Tom starts with 3 apples. He buys 4, so 3 + 4 = 8. Answer: 8\nAnswer: 7"),
    ("gold", " Tom starts with 3 apples. He buys 4, so 3 + 4 = 8.\nAnswer: 7"),
    ("own", " Tom starts with 3 apples. He buys 4, so 3 + 4 = 8.\nAnswer: 8"),
])
def test_negative_token_sequence(negative_setup, form, expected):
    ex, tokenizer, teacher, negatives = negative_setup
    data = build_train_data(WORDMATH, [ex], tokenizer, teacher_data=str(teacher), cl_pos_path=str(teacher),
                            cl_neg_path=str(negatives), cl_neg_form=form)
    (negative,) = data.negatives[0]
    prompt = tasks.build_prompt(WORDMATH, ex)
    whole = tokenizer(prompt + expected)["input_ids"]
    assert whole[:len(data.rows[0].prefix_ids)] == data.rows[0].prefix_ids
    assert negative == whole[len(data.rows[0].prefix_ids):] + [tokenizer.eos_token_id]


def test_readme_command_defaults_to_the_originals_negatives():
    assert parse(TrainArguments, readme_argv()).cl_neg_form == "original"


def test_files_are_used_as_given_unless_answer_filter(negative_setup):
    ex, tokenizer, _, negatives = negative_setup
    teacher = Path(negatives).with_name("teacher_with_wrong.json")
    teacher.write_text(json.dumps({QUESTION: ["3 + 4 = 7. Therefore, the answer is 7.", "3 + 4 = 9. Therefore, the answer is 9."]}))
    as_given = build_train_data(WORDMATH, [ex], tokenizer, teacher_data=str(teacher), answer_filter=False)
    filtered = build_train_data(WORDMATH, [ex], tokenizer, teacher_data=str(teacher), answer_filter=True)
    assert len(as_given.rows) == 2 and len(filtered.rows) == 1
    assert parse(TrainArguments, readme_argv()).answer_filter is False


# ---------------------------------------------------------------- 3. optimisation as the original ran it

def test_shipped_deepspeed_config_matches_the_originals_optimisation():
    config = json.loads((ROOT / "ds_stage3_config.json").read_text())
    assert "gradient_clipping" not in config                                   # no clipping
    assert config["scheduler"]["type"] == "WarmupLR"
    assert config["scheduler"]["params"].get("warmup_type", "log") == "log"   # DeepSpeed's default
    assert config["scheduler"]["params"]["warmup_min_lr"] == 0
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["eps"] == 1e-8
    fp16 = config["fp16"]
    assert (fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["min_loss_scale"]) == (20, 8, 1)
    assert config["zero_optimization"]["stage"] == 3


def test_warmup_log_matches_deepspeed_warmuplr():
    """The learning rate of each optimizer step: ours (a LambdaLR stepped as the Trainer steps it)
    against DeepSpeed's own WarmupLR stepped as its engine does."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    assert warmup_log_factor(0, 100) == 0.0 and warmup_log_factor(1, 100) == 0.0
    assert warmup_log_factor(10, 100) == pytest.approx(0.5)       # log(10) / log(100)
    assert warmup_log_factor(101, 100) == 1.0 and warmup_log_factor(5000, 100) == 1.0
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=7e-6)
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=7e-6)
    deepspeed_schedule = WarmupLR(theirs, warmup_min_lr=0, warmup_max_lr=7e-6, warmup_num_steps=10)
    our_schedule = torch.optim.lr_scheduler.LambdaLR(ours, functools.partial(warmup_log_factor, warmup_steps=10))
    for _ in range(15):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-12)
        for optimizer, schedule in ((theirs, deepspeed_schedule), (ours, our_schedule)):
            optimizer.step()
            schedule.step()


def test_non_deepspeed_defaults_are_the_originals(tmp_path):
    args = parse(TrainArguments, readme_argv())
    assert args.max_grad_norm == 0.0 and args.lr_scheduler_type == WARMUP_LOG
    hf = training_arguments(parse(TrainArguments, readme_argv()[:-2]), str(tmp_path), bf16=False, fp16=False)
    assert hf.max_grad_norm == 0.0 and hf.adam_epsilon == 1e-8 and hf.warmup_steps == 100


def test_our_optimisation_stays_reachable_under_deepspeed(monkeypatch):
    monkeypatch.chdir(ROOT)
    original = deepspeed_config(parse(TrainArguments, readme_argv()))
    assert "gradient_clipping" not in original and original["scheduler"]["type"] == "WarmupLR"
    ours = deepspeed_config(parse(TrainArguments, readme_argv("--max_grad_norm", "1.0",
                                                              "--lr_scheduler_type", "constant_with_warmup")))
    assert ours["gradient_clipping"] == 1.0 and "scheduler" not in ours  # the Trainer's schedule then applies


# ---------------------------------------------------------------- 4. the original's flags

def test_cl_clip_zeroes_the_self_reflection_loss_as_the_original():
    lm = torch.tensor(2.0)
    for cl_value, kept in ((0.5, False), (3.0, True), (0.005, False)):
        cl = torch.tensor(cl_value, requires_grad=True)
        out = clip_self_reflection(lm if cl_value != 0.005 else torch.tensor(0.001), cl)
        out.backward()
        assert out.item() == (cl_value if kept else 0.0) and cl.grad.item() == (1.0 if kept else 0.0)
    with pytest.raises(UserError, match="--cl_clip"):
        LossConfig(mle="no", contrastive=True, cl_clip=True)


def test_original_flags_parse():
    args = parse(TrainArguments, readme_argv(
        "--cl_clip", "yes", "--do_first_eval", "yes", "--train_on", "train", "--valid_on", "validation",
        "--test_on", "test", "--debug", "yes", "--world_size", "16", "--rank_offset", "8", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--teacher_data_random", "0.5", "--resume", "checkpoints/x/checkpoint-10"))
    assert (args.cl_clip, args.do_first_eval, args.debug, args.eval_split) == (True, True, True, "validation")
    assert (args.world_size, args.rank_offset, args.master_addr, args.master_port) == (16, 8, "10.0.0.1", 29500)
    assert args.teacher_data_random == "0.5" and args.resume_path == "checkpoints/x/checkpoint-10"
    assert parse(TrainArguments, readme_argv("--resume", "yes")).resume_path is None
    with pytest.raises(UserError, match="--teacher_data_random"):
        parse(TrainArguments, readme_argv("--teacher_data_random", "1.5"))
    with pytest.raises(UserError, match="--do_first_eval"):
        parse(TrainArguments, readme_argv("--do_eval", "no", "--do_first_eval", "yes"))


def test_multi_machine_flags_become_a_torchrun_launch():
    flags = torchrun_flags(8, world_size=16, rank_offset=8, master_addr="10.0.0.1", master_port=29500)
    assert flags == ["--nproc_per_node", "8", "--master_port", "29500", "--nnodes", "2", "--node_rank", "1",
                     "--master_addr", "10.0.0.1"]
    assert torchrun_flags(8, master_port=29501)[:4] == ["--nproc_per_node", "8", "--master_port", "29501"]
    for bad in (dict(world_size=12, master_port=29500), dict(world_size=16, rank_offset=4, master_port=29500),
                dict(world_size=16, rank_offset=8)):  # not a multiple, an offset inside a machine, no port
        with pytest.raises(UserError):
            torchrun_flags(8, **bad)


class _Rows:
    def __init__(self, qids):
        from train_data import TrainRow
        self.rows = [TrainRow(q, [1], [2], f"r{i}") for i, q in enumerate(qids)]
        self.counts = {}


def test_teacher_data_random_is_a_keep_probability():
    qids = [i // 4 for i in range(400)]  # 100 questions, 4 rationales each
    kept_all, half, one = _Rows(qids), _Rows(qids), _Rows(qids)
    sample_teacher_rows(kept_all, "1.0", seed=0)
    sample_teacher_rows(half, "0.5", seed=0)
    sample_teacher_rows(one, "one", seed=0)
    assert len(kept_all.rows) == 400
    assert 160 < len(half.rows) < 240 and len({r.qid for r in half.rows}) < 100  # rows, not questions, are drawn
    assert sorted(r.qid for r in one.rows) == list(range(100))
    with pytest.raises(UserError):
        sample_teacher_rows(_Rows([0]), "0", seed=0)


def test_resume_path_must_be_a_checkpoint(tmp_path):
    class Args:
        resume_path = str(tmp_path / "missing")
    with pytest.raises(UserError, match="--resume"):
        check_resume(Args)
    (tmp_path / "checkpoint-3").mkdir()
    Args.resume_path = str(tmp_path / "checkpoint-3")
    with pytest.raises(UserError, match="trainer_state.json"):
        check_resume(Args)
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        check_resume(Args)
    (tmp_path / "checkpoint-3" / "global_step3").mkdir()  # DeepSpeed's shards
    assert check_resume(Args) == str(tmp_path / "checkpoint-3")


def test_first_eval_debug_clip_and_log_warmup_in_one_run(tiny_student, data_dir, teacher_files, tmp_path):
    """--do_first_eval scores the starting model at step 0; --debug trains on 97 questions, evaluates
    33 items and logs every step; the learning rate rises as DeepSpeed's log warm-up."""
    teacher, negatives = teacher_files
    out = tmp_path / "run"
    result = run_script("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
                        "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
                        "--cl_neg_path", str(negatives), "--cl_clip", "yes", "--train_bsz", "4", "--lr", "1e-3",
                        "--warmup_steps", "10", "--max_steps", "3", "--do_eval", "yes", "--do_first_eval", "yes",
                        "--debug", "yes", "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval"][0]["step"] == 0 and summary["eval"][0]["total"] == 33
    assert summary["data"]["questions_in_split"] == 97
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert len(rates) == 3  # a log line every step
    # the rate each step ran at: DeepSpeed's WarmupLR starts at 0 and its engine steps it after each step
    assert rates == pytest.approx([0.0, 0.0, 1e-3 * math.log(2) / math.log(10)])


def test_resume_from_a_checkpoint_path(tiny_student, data_dir, teacher_files, tmp_path):
    teacher, _ = teacher_files
    out = tmp_path / "run"
    base = ["run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
            "--teacher_data", str(teacher), "--train_bsz", "4", "--save_strategy", "steps", "--save_steps", "1"]
    first = run_script(*base, "--max_steps", "1", "--output_dir", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_script(*base, "--max_steps", "2", "--resume", str(out / "checkpoint-1"))  # no --output_dir: its parent
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-1'}" in resumed.stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_defaults_that_differ_from_the_original_are_named():
    from args import ORIGINAL_TRAIN_DEFAULTS
    from flags import differing_defaults

    assert differing_defaults(parse(TrainArguments, readme_argv()), ORIGINAL_TRAIN_DEFAULTS, readme_argv()) == \
        ["--eval_bsz 16 (original: 4)"]  # the README sets every other one itself
    bare = differing_defaults(parse(TrainArguments, []), ORIGINAL_TRAIN_DEFAULTS, [])
    assert sorted(bare) == ["--eval_bsz 16 (original: 4)", "--lr 7e-06 (original: 1e-06)",
                            "--merge_losses yes (original: no)", "--weight_decay 0.01 (original: 0.1)"]
