"""--lora_r > 0: LoRA adapters through peft. Only the adapters train, the shared-prefix step and the
triplet loss run unchanged on the PeftModel, <output_dir>/final is the merged plain checkpoint and
<output_dir>/final_adapter the adapter alone, with and without ZeRO-3; --resume continues the adapter."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import hf_internals
import shared_step
from args import TrainArguments
from common import UserError
from conftest import run_script
from driver_args import RoundsArguments
from flags import parse
from lora import add_lora, lora_layers, lora_targets, merge_lora_state
from losses import LossConfig
from shared_step import compute_tailored_loss
from test_losses import TOL, batches, make_model, setup  # noqa: F401  (setup: a module fixture)

GPTJ_TARGETS = ["k_proj", "v_proj", "q_proj", "out_proj"]
LAYER = "transformer.h.0.attn.q_proj"  # a target layer of the tiny GPT-J checked by hand


def train_argv(student: Path, data_dir: Path, teacher: Path, negatives: Path, out: Path, *extra: str) -> list[str]:
    return ["run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(student),
            "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
            "--cl_neg_path", str(negatives), "--train_bsz", "4", "--lr", "1e-2", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "1",
            "--output_dir", str(out), *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def check_lora_run(out: Path, student: Path, stdout: str) -> None:
    """Adapter and merged model saved; the merged weights are base + scale * B @ A on the target layers
    and the student's own everywhere else (only the adapters trained); the merged model reloads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert "lora targets (auto): " + ",".join(GPTJ_TARGETS) in stdout
    assert "trainable parameters" in stdout
    adapter = out / "final_adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == sorted(GPTJ_TARGETS)
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (final / "run_args.json").is_file() and not list(final.glob("adapter_*"))
    merged, start = weights(final), weights(student)
    assert not [k for k in merged if "lora" in k or "base_layer" in k]
    assert set(merged) <= set(start)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (lora[f"base_model.model.{LAYER}.lora_{x}.weight"] for x in "AB")
    assert b.abs().max() > 0  # B starts at zero: it trained
    torch.testing.assert_close(merged[f"{LAYER}.weight"], start[f"{LAYER}.weight"] + (b @ a) * (8 / 4),
                               atol=1e-5, rtol=1e-5)
    targeted = {k for k in merged if any(f".attn.{t}." in k for t in GPTJ_TARGETS)}
    assert targeted and all(not torch.equal(merged[k], start[k]) for k in targeted if k.endswith("weight"))
    assert all(torch.equal(merged[k], start[k]) for k in merged if k not in targeted)  # the base stayed frozen
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        new = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=ids).logits
        old = AutoModelForCausalLM.from_pretrained(student).eval()(input_ids=ids).logits
    assert (new - old).abs().max() > 1e-3


@pytest.fixture(scope="module")
def lora_run(tiny_student, data_dir, teacher_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    result = run_script(*train_argv(tiny_student, data_dir, *teacher_files, out, "--max_steps", "3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_lora_run_trains_only_the_adapters_and_saves_merged_and_adapter(lora_run, tiny_student):
    out, result = lora_run
    check_lora_run(out, tiny_student, result.stdout)
    checkpoint = out / "checkpoint-3"  # an intermediate checkpoint holds the adapter only
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "cl_loss" in e]
    assert logged and all(e["triplet_fraction"] > 0 for e in logged)


def test_infer_scores_the_merged_checkpoint(lora_run, data_dir, tmp_path):
    out, _ = lora_run
    evaluation = run_script("infer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--rationale",
                            "--checkpoint", str(out / "final"), "--limit", "6", "--output_dir", str(tmp_path / "eval"))
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    scored = json.loads(next((tmp_path / "eval").glob("Acc*.json")).read_text())
    assert scored["total"] == 6 and len(scored["results"]) == 6


def test_lora_under_zero3_trains_and_saves(tiny_student, data_dir, teacher_files, tmp_path):
    out = tmp_path / "ds"
    result = run_script(*train_argv(tiny_student, data_dir, *teacher_files, out, "--max_steps", "2", "--device", "cpu",
                                    "--fp16", "no", "--deepspeed", "ds_stage3_config.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_lora_run(out, tiny_student, result.stdout)
    assert list((out / "checkpoint-2").glob("global_step2/*optim_states.pt"))


def test_lora_under_zero3_without_gathered_weights_is_one_clear_line(tiny_student, data_dir, teacher_files, tmp_path):
    config = json.loads(Path("ds_stage3_config.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "ds.json").write_text(json.dumps(config))
    result = run_script(*train_argv(tiny_student, data_dir, *teacher_files, tmp_path / "out", "--max_steps", "1",
                                    "--deepspeed", str(tmp_path / "ds.json")))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stage3_gather_16bit_weights_on_model_save" in lines[0], result.stderr[-2000:]


def test_resume_continues_the_adapter(tiny_student, data_dir, teacher_files, tmp_path):
    """Stopped after checkpoint-2 of 4 steps, a --resume yes run ends with the same weights as the run
    that was not stopped: the adapter, its optimizer state and the data order all come back."""
    out = tmp_path / "run"
    argv = train_argv(tiny_student, data_dir, *teacher_files, out, "--max_steps", "4", "--save_strategy", "steps",
                      "--save_steps", "2", "--resume", "yes")
    whole = run_script(*argv)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    uninterrupted = weights(out / "final")
    for folder in ("final", "final_adapter", "checkpoint-4"):
        shutil.rmtree(out / folder)
    resumed = run_script(*argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    again = weights(out / "final")
    assert set(again) == set(uninterrupted)
    for key in again:
        torch.testing.assert_close(again[key], uninterrupted[key], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- in process

def test_auto_targets_per_architecture(tiny_student):
    from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    assert lora_targets(AutoModelForCausalLM.from_pretrained(tiny_student)) == GPTJ_TARGETS
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert lora_targets(gpt2) == ["c_attn", "attn.c_proj"]  # the MLP's c_proj is left alone
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, vocab_size=32,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert lora_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, vocab_size=32,
                                            num_attention_heads=2))
    assert lora_targets(neox) == ["query_key_value", "dense"]  # the MLP's are dense_h_to_4h, dense_4h_to_h

    class Plain(torch.nn.Module):  # no attention module: every linear layer but the LM head
        def __init__(self):
            super().__init__()
            self.up, self.down, self.lm_head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 32)

        def get_output_embeddings(self):
            return self.lm_head

    assert lora_targets(Plain()) == ["up", "down"]
    assert lora_targets(llama, "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="--lora_targets: no module named qkv"):
        lora_targets(llama, "q_proj,qkv")


def test_lora_flags_are_checked_and_passed_by_the_round_driver(tmp_path):
    with pytest.raises(UserError, match="--lora_dropout must be a number < 1"):
        parse(TrainArguments, ["--lora_dropout", "1"])
    with pytest.raises(UserError, match="--lora_r must be a number >= 0"):
        parse(TrainArguments, ["--lora_r", "-2"])
    with pytest.raises(UserError, match="--lora_alpha must be a number > 0"):
        parse(RoundsArguments, ["--lora_alpha", "0"])
    defaults = parse(TrainArguments, [])
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.lora_targets) == (0, 16, 0.05, "auto")


@pytest.mark.parametrize("mle,cl_anchor", [("weight", "detached"), ("weight", "full"), ("nograd", "detached")])
def test_shared_step_on_a_peft_model_equals_the_merged_model(setup, mle, cl_anchor, monkeypatch):  # noqa: F811
    """The step runs through the PeftModel's forward: the final-hidden-state hook finds the base model,
    the LM forward's KV cache is reused (no extra prefix forward), gradients reach the adapters only,
    and the losses equal those of the merged model."""
    tokenizer, features = setup
    args = parse(TrainArguments, ["--lora_r", "4", "--lora_dropout", "0"])
    model = add_lora(make_model("gptj", tokenizer), args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    assert hf_internals.unwrap(model) is model.get_base_model()
    batch, _ = batches(tokenizer, features)
    cfg = LossConfig(mle=mle, contrastive=True, cl_anchor=cl_anchor)
    extra_prefix = []
    real_prefix_cache = shared_step.prefix_cache
    monkeypatch.setattr(shared_step, "prefix_cache",
                        lambda *a, **k: extra_prefix.append(1) or real_prefix_cache(*a, **k))
    loss, metrics = compute_tailored_loss(model, batch, cfg)
    assert len(extra_prefix) == (0 if mle == "weight" else 1)  # weight: the LM forward's cache is reused
    loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in name for name in grads)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)

    merged_state = merge_lora_state(model.state_dict(), lora_layers(model))
    plain = make_model("gptj", tokenizer)
    plain.load_state_dict(merged_state)
    merged_loss, merged_metrics = compute_tailored_loss(plain, batch, cfg)
    assert abs(loss.item() - merged_loss.item()) < TOL
    assert abs(metrics["cl_loss"] - merged_metrics["cl_loss"]) < TOL and metrics["cl_loss"] > 0
