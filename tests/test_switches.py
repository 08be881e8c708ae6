"""Throughput switches (--attn_implementation, --gradient_checkpointing, --lm_loss_impl, --torch_compile with
--pad_to_multiple_of, --bf16_weights, the Trainer's per-step overheads): each keeps the loss values (and
gradients) of the plain path. Small random-init GPT-J and Llama, as in test_losses.py."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from transformers import GPTJForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

import shared_step
from args import TrainArguments
from common import UserError
from conftest import run_script
from flags import parse
from hf_internals import enable_checkpointing
from losses import MLE_MODES, LossConfig, chunked_lm_loss, liger_lm_loss, weighted_lm_loss
from precision import MasterWeightAdamW
from shared_step import compute_tailored_loss
from speed import attention_implementation, bucket_batch, check_switches, compile_layers
from test_losses import batches, gradients, make_model, setup  # noqa: F401  (fixtures)

# tiny models: one intra-op thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- LM loss from hidden states (pure functions)

def lm_case(seed: int = 0, vocab: int = 50, d: int = 16):
    """Hidden states, an output head with a bias (as GPT-J's), ids, left-padded masks, continuation marks."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, d, generator=gen, requires_grad=True)
    head = torch.nn.Linear(d, vocab)
    torch.nn.init.normal_(head.weight, generator=gen)
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0                                        # left padding
    mask[0, 9:] = 0                                        # and right padding
    cont = torch.zeros(3, 11, dtype=torch.long)
    cont[0, 5:9], cont[1, 6:], cont[2, 8:] = 1, 1, 1
    return hidden, head, ids, mask, cont


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("mode", MLE_MODES)
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_lm_loss_equals_weighted_lm_loss(mode, chunk):
    hidden, head, ids, mask, cont = lm_case()
    plain = weighted_lm_loss(head(hidden), ids, mask, cont, mode, 0.1)
    chunked = chunked_lm_loss(hidden, head, ids, mask, cont, mode, 0.1, chunk=chunk)
    assert chunked.dtype == torch.float32 and abs(chunked.item() - plain.item()) < 1e-5
    if mode == "no":
        return
    inputs = (hidden, head.weight, head.bias)
    for a, b in zip(grads_of(plain, *inputs), grads_of(chunked, *inputs)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_lm_loss_with_extra_empty_chunks_and_a_tied_head():
    """ZeRO-3 ranks run as many chunks as the busiest rank: empty ones change nothing. A tied head (the
    embedding matrix) gets the gradients of both uses."""
    hidden, _, ids, mask, cont = lm_case(1)
    embedding = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight
    inputs = embedding(ids) + hidden
    plain = weighted_lm_loss(head(inputs), ids, mask, cont, "weight", 0.1)
    calls = []
    chunked = chunked_lm_loss(inputs, head, ids, mask, cont, "weight", 0.1, chunk=8,
                              n_chunks=lambda count: calls.append(count) or count + 2)
    assert calls == [math.ceil(int(((mask[:, :-1] * mask[:, 1:]) > 0).sum()) / 8)]
    assert abs(chunked.item() - plain.item()) < 1e-5
    for a, b in zip(grads_of(plain, hidden, embedding.weight), grads_of(chunked, hidden, embedding.weight)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_liger_path_sums_each_weight_class(monkeypatch):
    """liger-kernel is not installed here: a stand-in with its interface (weight, input, target, bias;
    reduction sum) checks that the prompt and continuation targets are weighted as weighted_lm_loss does."""
    class StandIn(torch.nn.Module):
        def __init__(self, reduction="mean"):
            super().__init__()
            assert reduction == "sum"

        def forward(self, weight, x, target, bias=None):
            return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight, bias), target, reduction="sum")

    package = types.ModuleType("liger_kernel")
    package.transformers = types.ModuleType("liger_kernel.transformers")
    package.transformers.LigerFusedLinearCrossEntropyLoss = StandIn
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", package.transformers)
    hidden, head, ids, mask, cont = lm_case(2)
    for mode in MLE_MODES:
        plain = weighted_lm_loss(head(hidden), ids, mask, cont, mode, 0.3)
        fused = liger_lm_loss(hidden, head.weight, head.bias, ids, mask, cont, mode, 0.3)
        assert abs(fused.item() - plain.item()) < 1e-5, mode


def test_lm_loss_impl_auto_and_bad_values():
    assert LossConfig(lm_loss_impl="auto").lm_loss_impl == ("chunked" if torch.cuda.is_available() else "logits")
    with pytest.raises(UserError, match="--lm_loss_impl must be one of logits, chunked, liger"):
        LossConfig(lm_loss_impl="fused")


# ---------------------------------------------------------------- the shared step with the switches

def tied_llama(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                        tie_word_embeddings=True)).train()


MODELS = {"gptj": lambda tok: make_model("gptj", tok), "llama": lambda tok: make_model("llama", tok),
          "llama_tied": tied_llama}
CASES = [("weight", "detached"), ("weight", "full"), ("hf", "detached"), ("nograd", "detached"), ("no", "detached")]


def head_calls(model) -> list[int]:
    """Positions per call of the output head (forward calls, including replays in backward)."""
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape[:-1].numel()))
    return calls


def attention_calls(model) -> list[bool]:
    """One entry per call of the first layer's attention (replays in backward included): grad enabled?"""
    calls = []
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    attention = getattr(layer, "attn", None) or layer.self_attn
    attention.register_forward_hook(lambda m, a, out: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_checkpointing_and_chunked_loss_keep_values_and_gradients(setup, arch, monkeypatch):
    """Every mode: --gradient_checkpointing and --lm_loss_impl chunked (alone and together) give the plain
    step's loss and gradients. Under checkpointing every forward with grad is replayed in backward, the
    ones that read the prefix cache included, and the LM forward's cache is still reused (no extra prefix
    forward); the chunked loss never puts more than a chunk of positions through the head."""
    tokenizer, features = setup
    batch, _ = batches(tokenizer, features)
    prefix_runs = []
    real_prefix_cache = shared_step.prefix_cache
    monkeypatch.setattr(shared_step, "prefix_cache", lambda *a, **k: prefix_runs.append(1) or real_prefix_cache(*a, **k))
    for mle, anchor in CASES:
        plain = MODELS[arch](tokenizer)
        cfg = LossConfig(mle=mle, contrastive=True, cl_anchor=anchor)
        loss, metrics = compute_tailored_loss(plain, batch, cfg)
        reference = gradients(plain, loss)
        for checkpointed, impl in ((True, "logits"), (False, "chunked"), (True, "chunked")):
            model = MODELS[arch](tokenizer)
            if checkpointed:
                enable_checkpointing(model)
            heads, attention = head_calls(model), attention_calls(model)
            prefix_runs.clear()
            switched = LossConfig(mle=mle, contrastive=True, cl_anchor=anchor, lm_loss_impl=impl, lm_loss_chunk=16)
            value, switched_metrics = compute_tailored_loss(model, batch, switched)
            forwards = len(attention)
            grads = gradients(model, value)
            label = f"{arch} {mle} {anchor} checkpointed={checkpointed} {impl}"
            assert abs(value.item() - loss.item()) < 1e-5, label
            for name in ("lm_loss", "cl_loss"):
                assert abs(switched_metrics[name].item() - metrics[name].item()) < 1e-5, label
            assert grads.keys() == reference.keys(), label
            for name in grads:
                torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=1e-4, msg=label)
            assert len(prefix_runs) == (0 if mle in ("weight", "hf") else 1), label
            with_grad = sum(attention[:forwards])  # the prefix forward of nograd/no runs without grad
            replays = len(attention) - forwards
            assert replays == (with_grad if checkpointed else 0), label
            if impl == "chunked" and mle != "no":
                total = int(batch["cont_mask"].sum() + batch["prefix_mask"].sum())
                assert max(heads) <= 16 < total, label


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_bucketed_batches_keep_values(setup, arch):
    """--pad_to_multiple_of: wider, masked batches (prefix padded on the left, the rest on the right)."""
    tokenizer, features = setup
    batch, _ = batches(tokenizer, features)
    bucketed = bucket_batch(batch, 16, tokenizer.pad_token_id)
    for key in ("prefix_ids", "cont_ids", "contrast_ids", "position_ids", "contrast_position_ids"):
        assert bucketed[key].shape[1] % 16 == 0 and bucketed[key].shape[1] >= batch[key].shape[1]
    model = make_model(arch, tokenizer)
    for mle in ("weight", "nograd"):
        cfg = LossConfig(mle=mle, contrastive=True)
        plain, _ = compute_tailored_loss(model, batch, cfg)
        padded, _ = compute_tailored_loss(model, bucketed, cfg)
        assert abs(plain.item() - padded.item()) < 1e-5


def test_compiled_layers_keep_values_and_stop_recompiling(setup, monkeypatch):
    """--torch_compile (dynamo with its plain `eager` backend here: inductor's C++ builds take minutes on
    this CPU; the GPU bench runs inductor): the same loss as uncompiled, and once batches have changed
    widths and row counts, further batches add no graph (test_compile.py counts them)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    tokenizer, features = setup
    model, plain = make_model("gptj", tokenizer), make_model("gptj", tokenizer)
    assert compile_layers(model, backend="eager") == 2
    cfg = LossConfig(contrastive=True, mle="weight")
    graphs, prefix_runs = [], []
    real_prefix_cache = shared_step.prefix_cache
    monkeypatch.setattr(shared_step, "prefix_cache", lambda *a, **k: prefix_runs.append(1) or real_prefix_cache(*a, **k))
    for rows in ([0, 1, 2, 3], [1, 2, 3, 4], [0, 2, 3], [0, 1, 2, 3, 4], [1, 2, 4], [0, 3, 4], [0, 1, 2, 3], [2, 3, 4]):
        batch = bucket_batch(batches(tokenizer, [features[i] for i in rows])[0], 16, tokenizer.pad_token_id)
        value, _ = compute_tailored_loss(model, batch, cfg)
        value.backward()
        expected, _ = compute_tailored_loss(plain, batch, cfg)
        assert abs(value.item() - expected.item()) < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    # the second batch has other sizes (dynamic graphs from then on), the fifth a single row with a triplet
    # (dynamo specialises sizes 0 and 1, so such batches get graphs of their own); then nothing is added
    assert graphs[0] > 0 and graphs[5:] == [graphs[4]] * 3
    assert not prefix_runs  # the recording cache works inside compiled layers: the LM forward's prefix is reused


def test_attention_choice(monkeypatch, capsys):
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    assert attention_implementation("auto", config) == "sdpa"
    assert attention_implementation("eager", config) == "eager"
    monkeypatch.setattr(GPTJForCausalLM, "_supports_sdpa", False)
    from transformers import GPTJConfig
    assert attention_implementation("auto", GPTJConfig(n_layer=1)) == "eager"
    assert "has no sdpa attention" in capsys.readouterr().out


def test_sdpa_and_eager_attention_give_the_same_loss(setup):
    tokenizer, features = setup
    batch, _ = batches(tokenizer, features)
    values = []
    for attention in ("eager", "sdpa"):
        model = make_model("llama", tokenizer)
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        values.append(compute_tailored_loss(model, batch, LossConfig(contrastive=True))[0].item())
    assert abs(values[0] - values[1]) < 1e-5


def test_missing_packages_and_bad_switches_are_one_line_errors():
    args = parse(TrainArguments, ["--attn_implementation", "flash_attention_2"])
    if not importlib.util.find_spec("flash_attn"):
        with pytest.raises(UserError, match="needs the flash-attn package"):
            check_switches(args, None)
    args = parse(TrainArguments, ["--lm_loss_impl", "liger"])
    if not importlib.util.find_spec("liger_kernel"):
        with pytest.raises(UserError, match="needs liger-kernel"):
            check_switches(args, None)
    with pytest.raises(UserError, match="argument --attn_implementation.*: invalid choice: .fast."):
        parse(TrainArguments, ["--attn_implementation", "fast"])
    with pytest.raises(UserError, match="--optim: unknown optimizer"):
        parse(TrainArguments, ["--optim", "adamw_fast"])
    with pytest.raises(UserError, match="--bf16_weights"):
        parse(TrainArguments, ["--bf16_weights", "yes", "--deepspeed", "ds_stage3_config.json"])


# ---------------------------------------------------------------- --bf16_weights: fp32 master weights

def test_master_weight_adamw_steps_fp32_masters():
    """The master follows torch's AdamW on fp32 weights exactly; the bf16 parameter is the rounded master.
    An update below half a bf16 ulp, lost by plain bf16 AdamW, accumulates in the master."""
    torch.manual_seed(0)
    start = torch.randn(64) + 4.0                     # ulp of bf16 near 4 is 2^-5
    reference = torch.nn.Parameter(start.bfloat16().float())
    low = torch.nn.Parameter(start.bfloat16())
    plain_bf16 = torch.nn.Parameter(start.bfloat16())
    opts = (torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.01),
            MasterWeightAdamW([low], lr=1e-3, weight_decay=0.01),
            torch.optim.AdamW([plain_bf16], lr=1e-3, weight_decay=0.01))
    for step in range(20):
        # each step moves a weight by ~lr = 1e-3 (Adam's m / sqrt(v) is 1 for a steady gradient), 20 of them by
        # more than half a bf16 ulp; the noise is what a bf16 gradient can hold
        grad = (0.5 + 0.01 * torch.randn(64)).bfloat16().float()
        reference.grad, low.grad, plain_bf16.grad = grad.clone(), grad.bfloat16(), grad.bfloat16()
        for opt in opts:
            opt.step()
        master = opts[1].state[low]["master"]
        torch.testing.assert_close(master, reference.detach(), atol=1e-6, rtol=1e-6)
        assert torch.equal(low.detach(), master.bfloat16())
    assert torch.equal(plain_bf16.detach(), start.bfloat16())  # every update rounded away
    assert not torch.equal(low.detach(), start.bfloat16())
    saved = opts[1].state_dict()
    again = MasterWeightAdamW([torch.nn.Parameter(low.detach().clone())], lr=1e-3, weight_decay=0.01)
    again.load_state_dict(saved)
    assert torch.equal(next(iter(again.state.values()))["master"], opts[1].state[low]["master"])


# ---------------------------------------------------------------- run_trainer.py with every switch

@pytest.fixture(scope="module")
def untrained_student(data_dir, tmp_path_factory):
    """The tiny student's architecture without its warm start (the run below checks plumbing, not learning)."""
    import student
    from tasks import build_prompt, continuation, get_task, load_split

    task = get_task("wordmath")
    texts = [build_prompt(task, ex) + continuation(task, ex, ex.rationale)
             for ex in load_split("wordmath", "train", str(data_dir))]
    tokenizer = student.train_tokenizer(texts, vocab_size=400)
    model = student.build_model(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=1024)
    out = tmp_path_factory.mktemp("untrained")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_run_trainer_with_switches_logs_like_before(untrained_student, data_dir, teacher_files, tmp_path):
    """A short run with the switches on (checkpointing, chunked loss, bucketing, bf16 weights with fp32
    masters): it trains, and every training log still has the loss parts and the gradient norm, which
    without clipping is now computed only on the steps that log it."""
    teacher, negatives = teacher_files
    out = tmp_path / "run"
    result = run_script("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(untrained_student),
                        "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
                        "--cl_neg_path", str(negatives), "--train_bsz", "4", "--lr", "1e-3", "--warmup_steps", "0",
                        "--lr_scheduler_type", "constant", "--max_steps", "3", "--logging_steps", "2",
                        "--gradient_checkpointing", "yes", "--lm_loss_impl", "chunked", "--lm_loss_chunk", "64",
                        "--pad_to_multiple_of", "16", "--bf16_weights", "yes", "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e and "train_loss" not in e]
    assert [e["step"] for e in logged] == [1, 2]
    for entry in logged:
        assert {"lm_loss", "cl_loss", "triplet_fraction", "grad_norm"} <= set(entry)
        assert all(math.isfinite(entry[k]) for k in ("loss", "lm_loss", "cl_loss", "grad_norm"))
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(out / "final" / "model.safetensors")).values()} == {torch.bfloat16}
