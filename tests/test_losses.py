"""Losses: hand-computed cases, and the shared-prefix step against the literal five-forward reference."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hf_internals  # noqa: E402
import losses  # noqa: E402
import student  # noqa: E402
from common import UserError  # noqa: E402
import shared_step  # noqa: E402
from losses import (ANCHOR_MODES, MLE_MODES, REPR_MODES, LossConfig, representation, triplet_loss,  # noqa: E402
                    weighted_lm_loss)
from reference import FivePassCollator, five_pass_loss  # noqa: E402
from shared_step import compute_tailored_loss  # noqa: E402
from test_train_data import TASK, make_examples, make_tokenizer, triplet_files  # noqa: E402
from train_batches import TailoredCollator, TailoredDataset  # noqa: E402
from train_data import build_train_data  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# tiny models: one intra-op thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4


# ---------------------------------------------------------------- hand-computed cases

def test_weighted_lm_loss_uniform_logits():
    vocab = 4
    logits = torch.zeros(2, 5, vocab)                     # uniform: every target costs log 4
    ids = torch.tensor([[1, 2, 3, 1, 2], [0, 0, 3, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1 left-padded
    cont = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    log4 = math.log(vocab)
    # predicted targets: row 0 -> cols 1..4 (1 prompt, 3 continuation); row 1 -> cols 3, 4 (continuation)
    assert weighted_lm_loss(logits, ids, mask, cont, "weight", 0.1) == pytest.approx((0.1 + 3 + 2) * log4 / 6)
    assert weighted_lm_loss(logits, ids, mask, cont, "hf") == pytest.approx(log4)
    assert weighted_lm_loss(logits, ids, mask, cont, "nograd") == pytest.approx(log4)
    assert weighted_lm_loss(logits, ids, mask, cont, "no") == 0


def test_weighted_lm_loss_weights_prompt_tokens():
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.full((1, 4, 4), -30.0)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 30.0                # every target predicted perfectly ...
    logits[0, 0] = 0.0                                    # ... except the prompt target at column 1
    mask, cont = torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 0, 1, 1]])
    assert weighted_lm_loss(logits, ids, mask, cont, "weight", 0.1) == pytest.approx(0.1 * math.log(4) / 3, rel=1e-4)
    assert weighted_lm_loss(logits, ids, mask, cont, "hf") == pytest.approx(math.log(4) / 3, rel=1e-4)
    assert weighted_lm_loss(logits, ids, mask, cont, "nograd") == pytest.approx(0.0, abs=1e-6)


def test_triplet_loss_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    anchor = torch.stack([e1, e1, e1])
    positive = torch.stack([e1, e2, e1])                  # cos 1, 0, 1
    negative = torch.stack([e2, e1, -e1])                 # cos 0, 1, -1
    ones = torch.ones(3)
    per_row = torch.tensor([0.0, 2.0, 0.0])               # max(0, cos_n - cos_p + 1)
    assert triplet_loss(anchor, positive, negative, ones) == pytest.approx(per_row.mean().item())
    assert triplet_loss(anchor, positive, negative, torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(2.0)
    assert triplet_loss(anchor, positive, negative, torch.zeros(3)) == 0
    assert triplet_loss(anchor, positive, negative, ones, margin=0.5).item() == pytest.approx(1.5 / 3)


def test_representation_last_and_pool():
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert representation(hidden, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert representation(hidden, mask, "pool").tolist() == [[1.0, 2.0], [8.0, 9.0]]


def test_unknown_modes_are_clear_errors():
    with pytest.raises(UserError, match="--mle must be one of weight, hf, nograd, no, got 'mean'"):
        LossConfig(mle="mean")
    with pytest.raises(UserError, match="--mle"):
        weighted_lm_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                         torch.ones(1, 2), "bogus")
    with pytest.raises(UserError, match="--cl_repr"):
        LossConfig(cl_repr="first")
    with pytest.raises(UserError, match="--contrastive"):
        LossConfig(mle="no", contrastive=False)


# ---------------------------------------------------------------- tiny models and batches

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    examples = make_examples(200, seed=21)
    tokenizer = make_tokenizer(examples)
    teacher, pos, neg = triplet_files(tmp_path_factory.mktemp("files"), examples)
    data = build_train_data(TASK, examples, tokenizer, teacher_data=teacher, cl_pos_path=pos, cl_neg_path=neg)
    dataset = TailoredDataset(data, seed=0)
    # Rows of q0 (triplet), q1 (no distinct positive), q4 (no negative), q2, q7: mixed lengths and masks.
    by_q = {row.qid: i for i, row in enumerate(data.rows)}
    features = [dataset[by_q[q]] for q in (0, 1, 4, 2, 7)]
    assert [f["pos_ids"] is not None for f in features] == [True, False, False, True, True]
    return tokenizer, features


def make_model(arch: str, tokenizer) -> torch.nn.Module:
    if arch == "gptj":
        model = student.build_model(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=512, seed=0)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return model.train()  # dropout is 0 in both configs; train mode exercises the training code paths


@pytest.fixture(scope="module", params=["gptj", "llama"])
def arch_setup(request, setup):
    tokenizer, features = setup
    return make_model(request.param, tokenizer), tokenizer, features


def batches(tokenizer, features, contrastive: bool = True):
    args = (tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive)
    return TailoredCollator(*args)(features), FivePassCollator(*args)(features)


def record_triplets(monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """Capture anchor/positive/negative representations given to triplet_loss by either step."""
    calls, real = [], losses.triplet_loss

    def spy(anchor, positive, negative, row_mask, margin=1.0):
        calls.append((anchor.detach(), positive.detach(), negative.detach(), row_mask))
        return real(anchor, positive, negative, row_mask, margin)

    monkeypatch.setattr(losses, "triplet_loss", spy)
    return calls


# ---------------------------------------------------------------- equivalence with the five-forward reference

@pytest.mark.parametrize("mle", MLE_MODES)
@pytest.mark.parametrize("cl_repr", REPR_MODES)
@pytest.mark.parametrize("cl_anchor", ANCHOR_MODES)
def test_matches_five_pass_reference(arch_setup, mle, cl_repr, cl_anchor, monkeypatch):
    model, tokenizer, features = arch_setup
    ours_batch, ref_batch = batches(tokenizer, features)
    cfg = LossConfig(mle=mle, contrastive=True, cl_repr=cl_repr, cl_p=1.0, cl_ratio=0.5, cl_anchor=cl_anchor)
    calls = record_triplets(monkeypatch)
    loss, metrics = compute_tailored_loss(model, ours_batch, cfg)
    ref_loss, ref_metrics = five_pass_loss(model, ref_batch, cfg)
    assert abs(metrics["lm_loss"] - ref_metrics["lm_loss"]) < TOL
    assert abs(metrics["cl_loss"] - ref_metrics["cl_loss"]) < TOL
    assert abs(loss.item() - ref_loss.item()) < TOL
    assert metrics["triplet_fraction"] == ref_metrics["triplet_fraction"] == pytest.approx(0.6)
    assert (metrics["lm_loss"] > 0) == (mle != "no")
    # The representations themselves agree on rows with a triplet (cosines alone could hide a mix-up);
    # our weight/hf step runs positives and negatives for those rows only.
    ours_rows, ref_rows = calls[0][3].bool(), calls[1][3].bool()
    assert ours_rows.sum() == ref_rows.sum() == 3
    for ours, ref in zip(calls[0][:3], calls[1][:3]):
        torch.testing.assert_close(ours[ours_rows], ref[ref_rows], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mle", ["weight", "hf"])
def test_lm_only_matches_reference(arch_setup, mle):
    model, tokenizer, features = arch_setup
    ours_batch, ref_batch = batches(tokenizer, features, contrastive=False)
    cfg = LossConfig(mle=mle)
    loss, metrics = compute_tailored_loss(model, ours_batch, cfg)
    ref_loss, _ = five_pass_loss(model, ref_batch, cfg)
    assert abs(loss.item() - ref_loss.item()) < TOL and set(metrics) == {"lm_loss"}
    grads, ref_grads = gradients(model, loss), gradients(model, ref_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)


def test_fallback_prefix_forward_gives_same_values(arch_setup, monkeypatch):
    """When the full forward's cache cannot be reused (e.g. gradient checkpointing), the prefix is recomputed."""
    model, tokenizer, features = arch_setup
    ours_batch, _ = batches(tokenizer, features)
    cfg = LossConfig(contrastive=True)
    loss, _ = compute_tailored_loss(model, ours_batch, cfg)
    monkeypatch.setattr(shared_step, "reuse_prefix_cache", lambda *args: None)
    fallback, _ = compute_tailored_loss(model, ours_batch, cfg)
    assert abs(loss.item() - fallback.item()) < TOL


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mle", MLE_MODES)
def test_gradients_match_reference_with_the_detached_anchor(arch_setup, mle):
    """--cl_anchor detached (the default) has the original's graph in every mode, so gradients agree too."""
    model, tokenizer, features = arch_setup
    ours_batch, ref_batch = batches(tokenizer, features)
    cfg = LossConfig(mle=mle, contrastive=True, cl_anchor="detached")
    grads = gradients(model, compute_tailored_loss(model, ours_batch, cfg)[0])
    ref = gradients(model, five_pass_loss(model, ref_batch, cfg)[0])
    assert grads.keys() == ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-3)


def test_full_anchor_gradient_differs_from_the_original(arch_setup):
    """--cl_anchor full: same loss value, but the anchor's triplet gradient also flows through the prompt."""
    model, tokenizer, features = arch_setup
    ours_batch, ref_batch = batches(tokenizer, features)
    cfg = LossConfig(mle="weight", contrastive=True, cl_anchor="full", cl_p=5.0)
    grads = gradients(model, compute_tailored_loss(model, ours_batch, cfg)[0])
    ref = gradients(model, five_pass_loss(model, ref_batch, cfg)[0])
    assert max((grads[n] - ref[n]).abs().max().item() for n in grads) > 1e-4


def by_hand(model, features, mle_w: float = 0.1, margin: float = 1.0) -> tuple[float, float]:
    """(weighted LM loss, unscaled triplet loss) of rows that all have a triplet, one unpadded forward
    per sequence, no cache: the loss written out from its definition."""
    ce_sum, targets, per_row = 0.0, 0, []
    with torch.no_grad():
        last = {}
        for i, f in enumerate(features):
            for part in ("cont_ids", "pos_ids", "neg_ids"):
                ids = torch.tensor([f["prefix_ids"] + f[part]])
                out = model(input_ids=ids, output_hidden_states=True)
                last[part] = out.hidden_states[-1][0, -1]
                if part == "cont_ids":
                    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
                    for t in range(1, ids.shape[1]):
                        weight = 1.0 if t >= len(f["prefix_ids"]) else mle_w
                        ce_sum += -weight * logp[t - 1, ids[0, t]].item()
                        targets += 1
            cos_p = torch.dot(last["cont_ids"], last["pos_ids"]) / (last["cont_ids"].norm() * last["pos_ids"].norm())
            cos_n = torch.dot(last["cont_ids"], last["neg_ids"]) / (last["cont_ids"].norm() * last["neg_ids"].norm())
            per_row.append(max(0.0, (cos_n - cos_p).item() + margin))
    return ce_sum / targets, sum(per_row) / len(per_row)


@pytest.mark.parametrize("cl_anchor", ANCHOR_MODES)
def test_two_row_batch_against_the_definition(arch_setup, cl_anchor):
    model, tokenizer, features = arch_setup
    two = [features[0], features[3]]  # both with a triplet, different lengths (padding on both sides)
    assert all(f["pos_ids"] is not None for f in two) and len(two[0]["prefix_ids"]) != len(two[1]["prefix_ids"])
    ours_batch, _ = batches(tokenizer, two)
    cfg = LossConfig(mle="weight", mle_w=0.1, contrastive=True, cl_ratio=0.5, cl_p=0.7, cl_anchor=cl_anchor)
    loss, metrics = compute_tailored_loss(model, ours_batch, cfg)
    lm, triplet = by_hand(model, two, mle_w=0.1, margin=0.7)
    assert metrics["lm_loss"].item() == pytest.approx(lm, abs=TOL)
    assert metrics["cl_loss"].item() == pytest.approx(0.5 * triplet, abs=TOL)
    assert loss.item() == pytest.approx(lm + 0.5 * triplet, abs=TOL)


def test_gradients_finite_and_nonzero_with_triplet(arch_setup):
    """mle weight + triplet: the anchor's triplet gradient may also reach the prefix (documented); LM head
    and embeddings get finite, non-zero gradients, and the triplet part alone reaches the embeddings."""
    model, tokenizer, features = arch_setup
    ours_batch, _ = batches(tokenizer, features)
    grads = gradients(model, compute_tailored_loss(model, ours_batch, LossConfig(contrastive=True))[0])
    head = model.get_output_embeddings().weight
    embeddings = model.get_input_embeddings().weight
    names = {id(p): n for n, p in model.named_parameters()}
    for param in (head, embeddings):
        g = grads[names[id(param)]]
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    triplet_only = gradients(model, compute_tailored_loss(model, ours_batch,
                                                          LossConfig(mle="no", contrastive=True, cl_p=5.0))[0])
    g = triplet_only[names[id(embeddings)]]
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_no_triplet_rows_gives_zero_cl_loss(arch_setup):
    model, tokenizer, features = arch_setup
    lonely = [dict(f, pos_ids=None, neg_ids=None) for f in features]
    ours_batch, _ = batches(tokenizer, lonely)
    loss, metrics = compute_tailored_loss(model, ours_batch, LossConfig(mle="no", contrastive=True))
    assert metrics["cl_loss"] == 0 and metrics["triplet_fraction"] == 0
    loss.backward()  # still a graph: every rank runs the same forwards and backward
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mle", ["weight", "nograd"])
def test_gradient_checkpointing_keeps_the_prefix_cache(setup, mle):
    """transformers 5 layers drop a passed KV cache under checkpointing; the loss must not change."""
    tokenizer, features = setup
    model = make_model("gptj", tokenizer)
    ours_batch, ref_batch = batches(tokenizer, features)
    cfg = LossConfig(mle=mle, contrastive=True)
    plain, _ = compute_tailored_loss(model, ours_batch, cfg)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert hf_internals.checkpointing(model)
    checkpointed, _ = compute_tailored_loss(model, ours_batch, cfg)
    reference, _ = five_pass_loss(model, ref_batch, cfg)
    assert abs(checkpointed.item() - plain.item()) < TOL and abs(reference.item() - plain.item()) < TOL
    checkpointed.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- a loss that needs token log-probs

@pytest.mark.parametrize("mle,cl_anchor", [("weight", "detached"), ("weight", "full"), ("nograd", "detached")])
def test_registered_loss_gets_token_logprobs_of_positive_and_negative(arch_setup, mle, cl_anchor, monkeypatch):
    """A loss registered with needs_logprobs gets each continuation token's log-probability under the model,
    the same as an unpadded forward of prompt + continuation, with no cache."""
    model, tokenizer, features = arch_setup
    two = [features[0], features[3]]
    seen = []

    def probe(inputs, cfg):
        seen.append(inputs)
        return (inputs.positive_logprobs.sum() - inputs.negative_logprobs.sum()) * 0.0 + inputs.anchor.sum() * 0.0

    monkeypatch.setitem(losses.CONTRAST_LOSSES, "probe", losses.ContrastLoss(probe, needs_logprobs=True))
    ours_batch, _ = batches(tokenizer, two)
    compute_tailored_loss(model, ours_batch, LossConfig(mle=mle, contrastive=True, cl_loss="probe", cl_anchor=cl_anchor))
    (inputs,) = seen
    for i, f in enumerate(two):
        for part, logprobs, mask in (("pos_ids", inputs.positive_logprobs, inputs.positive_mask),
                                     ("neg_ids", inputs.negative_logprobs, inputs.negative_mask)):
            ids = torch.tensor([f["prefix_ids"] + f[part]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = len(f["prefix_ids"])
            expected = torch.stack([logp[start + j - 1, tok] for j, tok in enumerate(f[part])])
            assert int(mask[i].sum()) == len(f[part])
            torch.testing.assert_close(logprobs[i, :len(f[part])].detach(), expected, atol=1e-4, rtol=1e-4)
            assert (logprobs[i, len(f[part]):] == 0).all()


@pytest.mark.parametrize("mle", ["weight", "nograd"])
def test_dpo_is_log_2_at_step_0(arch_setup, mle):
    """--cl_loss dpo with the reference = the policy's own starting weights: every margin is 0, the loss log 2,
    and the reference's token log-probs (a plain forward, no cache) are the policy's."""
    import copy

    model, tokenizer, features = arch_setup
    ours_batch, _ = batches(tokenizer, features)
    cfg = LossConfig(mle=mle, contrastive=True, cl_loss="dpo", cl_beta=2.0, cl_ratio=1.0)
    assert cfg.needs_logprobs and cfg.needs_reference
    seen = []
    monkey = losses.ContrastLoss(lambda x, c: seen.append(x) or losses.dpo_term(x, c), True, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(losses.CONTRAST_LOSSES, "dpo", monkey)
        loss, metrics = compute_tailored_loss(model, ours_batch, cfg, reference=copy.deepcopy(model).eval())
    assert metrics["cl_loss"].item() == pytest.approx(math.log(2), abs=1e-4)
    (x,) = seen
    torch.testing.assert_close(x.reference_positive_logprobs, x.positive_logprobs.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.reference_negative_logprobs, x.negative_logprobs.detach(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reference"):
        compute_tailored_loss(model, ours_batch, cfg)


def test_unknown_self_reflection_loss_is_a_clear_error():
    with pytest.raises(UserError, match="--cl_loss must be one of triplet"):
        LossConfig(contrastive=True, cl_loss="kto")
