"""The preference losses (--cl_loss simpo | orpo, reference-free; dpo, against the starting model): values on hand-made log-probs, the
direction of their gradients, masking, and one training step through run_trainer.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

import losses
from conftest import run_script
from losses import ContrastInputs, LossConfig, dpo_loss, log_odds, orpo_loss, sequence_logprob, simpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sequence_logprob_averages_over_real_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert sequence_logprob(logprobs, mask).tolist() == [-2.0, -4.0]
    assert sequence_logprob(logprobs, mask, average=False).tolist() == [-6.0, -4.0]
    assert sequence_logprob(logprobs, torch.zeros_like(mask)).tolist() == [0.0, 0.0]  # no token: no NaN


def test_simpo_value_by_hand():
    chosen, rejected = torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -0.8])
    got = simpo_loss(chosen, rejected, torch.ones(2), beta=2.0, gamma=1.0)
    # row 0: 2 * (1.0) - 1 = 1; row 1: 2 * (-0.2) - 1 = -1.4
    want = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.4))) / 2
    assert got.item() == pytest.approx(want, abs=1e-6)
    # chosen ahead by exactly gamma / beta: the loss is log 2, not 0 (SimPO keeps a margin beyond it)
    assert simpo_loss(torch.tensor([0.0]), torch.tensor([-0.5]), torch.ones(1)).item() == pytest.approx(math.log(2))


def test_orpo_value_by_hand():
    chosen, rejected = torch.tensor([math.log(0.8)]), torch.tensor([math.log(0.2)])
    got = orpo_loss(chosen, rejected, torch.ones(1))
    # odds 4 and 1/4: log-odds ratio log 16
    assert got.item() == pytest.approx(-math.log(sigmoid(math.log(16))), abs=1e-6)
    assert log_odds(torch.tensor([math.log(0.5)])).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(log_odds(torch.tensor([0.0]))).all()  # p = 1: capped, not infinite


def test_dpo_value_by_hand():
    pc, pr, rc, rr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.5
    # the textbook -log sigmoid(beta * ((pc - rc) - (pr - rr))): row 0: 0.5 * (1 - -0.5) = 0.75; row 1: 0.5 * (1 - -1) = 1
    want = (-math.log(sigmoid(0.75)) - math.log(sigmoid(1.0))) / 2
    assert dpo_loss(pc, pr, rc, rr, torch.ones(2), beta).item() == pytest.approx(want, abs=1e-6)
    assert dpo_loss(pc, pr, rc, rr, torch.tensor([0.0, 1.0]), beta).item() == pytest.approx(-math.log(sigmoid(1.0)), abs=1e-6)
    assert dpo_loss(pc, pr, pc, pr, torch.ones(2), beta).item() == pytest.approx(math.log(2))  # policy = reference
    # through the registry: summed (not averaged) over real tokens, padding ignored
    x = ContrastInputs(anchor=torch.zeros(1, 2), positive=torch.zeros(1, 2), negative=torch.zeros(1, 2),
                       row_mask=torch.ones(1), positive_logprobs=torch.tensor([[-4.0, -6.0, -99.0]]),
                       negative_logprobs=torch.tensor([[-12.0, 0.0, 0.0]]), positive_mask=torch.tensor([[1, 1, 0]]),
                       negative_mask=torch.tensor([[1, 0, 0]]), reference_positive_logprobs=torch.tensor([[-5.0, -6.0, 7.0]]),
                       reference_negative_logprobs=torch.tensor([[-11.5, 0.0, 0.0]]))
    entry = losses.CONTRAST_LOSSES["dpo"]
    assert entry.needs_logprobs and entry.needs_reference
    got = entry.fn(x, LossConfig(contrastive=True, cl_loss="dpo", cl_beta=beta))
    assert got.item() == pytest.approx(-math.log(sigmoid(0.75)), abs=1e-6)


@pytest.mark.parametrize("loss", [lambda c, r, m: simpo_loss(c, r, m), orpo_loss], ids=["simpo", "orpo"])
def test_gradient_raises_the_teacher_and_lowers_the_mistake(loss):
    chosen = torch.tensor([-1.0, -0.7], requires_grad=True)
    rejected = torch.tensor([-0.9, -1.2], requires_grad=True)
    loss(chosen, rejected, torch.ones(2)).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # gradient descent: chosen up, rejected down


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_rows_without_a_pair_and_padding_do_not_count(name):
    """Through the registry, as the shared step calls it: row 1 has no pair (row_mask 0), padding is ignored."""
    pos = torch.tensor([[-0.2, -0.4, -9.0], [-5.0, -5.0, -5.0]])
    neg = torch.tensor([[-1.0, -3.0, -7.0], [-0.1, -0.1, -0.1]])
    pos_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    neg_mask = torch.tensor([[1, 1, 1], [1, 1, 1]])
    x = ContrastInputs(anchor=torch.zeros(2, 4), positive=torch.zeros(2, 4), negative=torch.zeros(2, 4),
                       row_mask=torch.tensor([1.0, 0.0]), positive_logprobs=pos, negative_logprobs=neg,
                       positive_mask=pos_mask, negative_mask=neg_mask)
    entry = losses.CONTRAST_LOSSES[name]
    assert entry.needs_logprobs
    cfg = LossConfig(contrastive=True, cl_loss=name, cl_beta=2.0, cl_gamma=1.0)
    chosen, rejected = torch.tensor([-0.3]), torch.tensor([-11.0 / 3])
    alone = simpo_loss(chosen, rejected, torch.ones(1), 2.0, 1.0) if name == "simpo" else \
        orpo_loss(chosen, rejected, torch.ones(1))
    assert entry.fn(x, cfg).item() == pytest.approx(alone.item(), abs=1e-6)
    x.row_mask = torch.zeros(2)
    assert entry.fn(x, cfg).item() == 0.0
    assert cfg.needs_logprobs and not LossConfig(contrastive=True).needs_logprobs


def test_training_step_with_simpo_end_to_end(tiny_student, data_dir, teacher_files, tmp_path):
    teacher, negatives = teacher_files
    out = tmp_path / "simpo"
    result = run_script("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
                        "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
                        "--cl_neg_path", str(negatives), "--cl_loss", "simpo", "--cl_beta", "2.5", "--cl_gamma", "0.5",
                        "--cl_neg_form", "own", "--train_bsz", "4", "--lr", "1e-3", "--warmup_steps", "1",
                        "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "final" / "run_args.json").read_text())
    assert (saved["cl_loss"], saved["cl_beta"], saved["cl_gamma"]) == ("simpo", 2.5, 0.5)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "cl_loss" in e]
    # every row of the fixture has a pair, and a softplus is > 0: the term really ran
    assert len(logged) == 2 and all(e["cl_loss"] > 0 and math.isfinite(e["cl_loss"]) for e in logged)


def test_bad_preference_settings_are_one_line_errors(tiny_student, data_dir, teacher_files, tmp_path):
    teacher, negatives = teacher_files
    result = run_script("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
                        "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
                        "--cl_neg_path", str(negatives), "--cl_loss", "simpo", "--cl_beta", "0",
                        "--output_dir", str(tmp_path / "bad"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --cl_beta")


def test_training_with_dpo_end_to_end(tiny_student, data_dir, teacher_files, tmp_path):
    teacher, negatives = teacher_files
    common = ("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
              "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
              "--cl_neg_path", str(negatives), "--cl_loss", "dpo", "--cl_beta", "0.5", "--cl_ratio", "1",
              "--cl_neg_form", "own", "--train_bsz", "4", "--lr", "1e-3", "--lr_scheduler_type", "constant",
              "--max_steps", "3", "--logging_steps", "1")
    out = tmp_path / "dpo"
    result = run_script(*common, "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [e["cl_loss"] for e in state["log_history"] if "cl_loss" in e]
    # step 1 runs from the starting weights: log 2; later steps have moved away from the reference
    assert len(logged) == 3 and logged[0] == pytest.approx(math.log(2), abs=1e-3) and logged[-1] != logged[0]
    refused = run_script(*common, "--deepspeed", "ds_stage3_config.json", "--output_dir", str(tmp_path / "ds"))
    assert refused.returncode == 2 and "not supported with --deepspeed" in refused.stderr.strip().splitlines()[-1]
