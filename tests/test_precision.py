"""Training precision (precision.py): a half-precision checkpoint trains fp32 weights under --bf16/--fp16, the
fp32-master optimizer bounds its upcast copies, the memory it takes is said at start, and --device N trains
on GPU N (CUDA_VISIBLE_DEVICES set before anything asks CUDA)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import precision
from args import TrainArguments
from conftest import ROOT
from flags import parse
from precision import MasterWeightAdamW, element_groups, memory_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def saved_as(student, dtype: torch.dtype, out):
    """The tiny student re-saved in `dtype` (as most hub checkpoints are saved in bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student, dtype=dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


def train(start, data_dir, teacher_files, out, *extra: str, capsys=None) -> dict[str, torch.Tensor]:
    """Four steps at the paper's learning rate, in this process; the weights' change per tensor."""
    import train_setup

    teacher, negatives = teacher_files
    args = parse(TrainArguments, [
        "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(start), "--teacher_data", str(teacher),
        "--train_bsz", "4", "--lr", "7e-6", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--max_steps", "4", "--save_strategy", "no", "--weight_decay", "0", "--output_dir", str(out), *extra])
    train_setup.run_training(args)
    before = {k: v.float() for k, v in load_file(str(start / "model.safetensors")).items()}
    after = load_file(str(out / "final" / "model.safetensors"))
    return {k: after[k].float() - before[k] for k in before}


def flat(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for _, v in sorted(delta.items())])


@pytest.fixture(scope="module")
def fp32_reference(tiny_student, data_dir, teacher_files, tmp_path_factory):
    """The update of an fp32 run from the bf16-rounded weights (what every half-precision run starts from)."""
    root = tmp_path_factory.mktemp("fp32_run")
    start = saved_as(saved_as(tiny_student, torch.bfloat16, root / "bf16"), torch.float32, root / "fp32")
    return flat(train(start, data_dir, teacher_files, root / "run"))


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "--bf16"), (torch.float16, "--fp16")])
def test_a_half_precision_checkpoint_trains_fp32_weights_like_an_fp32_run(
        dtype, flag, tiny_student, data_dir, teacher_files, fp32_reference, tmp_path, capsys):
    start = saved_as(saved_as(tiny_student, torch.bfloat16, tmp_path / "bf16"), dtype, tmp_path / "half")
    delta = flat(train(start, data_dir, teacher_files, tmp_path / "run", flag, "yes"))
    said = capsys.readouterr().out
    assert f"trainable weights train in float32 (the checkpoint holds {str(dtype)[6:]})" in said
    assert "memory per process, before activations" in said
    # At lr 7e-6 most AdamW updates are below half a bf16 ulp of these weights: trained as loaded, nothing moves.
    assert delta.abs().max() > 0
    ratio = delta.norm() / fp32_reference.norm()
    cosine = torch.nn.functional.cosine_similarity(delta, fp32_reference, dim=0)
    assert 0.5 < ratio < 2 and cosine > 0.8, (float(ratio), float(cosine))


def test_the_weights_would_not_move_if_trained_in_bf16_as_loaded(tiny_student, data_dir, teacher_files, tmp_path,
                                                                 monkeypatch):
    """What the rule prevents (and what makes the test above able to fail): bf16 weights, plain AdamW, lr 7e-6."""
    monkeypatch.setattr(precision, "load_dtype", lambda args: torch.bfloat16)
    monkeypatch.setattr(precision, "ensure_fp32_trainable", lambda model, args: 0)
    start = saved_as(tiny_student, torch.bfloat16, tmp_path / "bf16")
    delta = flat(train(start, data_dir, teacher_files, tmp_path / "run", "--bf16", "yes"))
    moved = (delta != 0).float().mean()
    assert moved < 0.05, float(moved)


def test_load_dtype_rule():
    def args(*argv):
        return parse(TrainArguments, list(argv))

    assert precision.load_dtype(args("--bf16", "yes")) == torch.float32
    assert precision.load_dtype(args()) == torch.float32
    assert precision.load_dtype(args("--bf16_weights", "yes")) == torch.bfloat16
    # LoRA: the frozen base may stay half precision; peft makes the trained adapters float32
    assert precision.load_dtype(args("--bf16", "yes", "--lora_r", "4")) == torch.bfloat16
    assert precision.load_dtype(args("--lora_r", "4")) == torch.float32
    lora = torch.nn.Linear(4, 4).bfloat16()
    frozen = torch.nn.Linear(4, 4).bfloat16().requires_grad_(False)
    model = torch.nn.Sequential(lora, frozen)
    assert precision.ensure_fp32_trainable(model, args()) == 2  # weight and bias
    assert lora.weight.dtype == torch.float32 and frozen.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- the fp32-master optimizer's memory

def test_master_weight_adamw_upcasts_a_bounded_number_of_gradient_elements(monkeypatch):
    torch.manual_seed(0)
    shapes = [(64, 32), (16,), (128, 8), (300,), (8, 8)]
    starts = [torch.randn(s) for s in shapes]

    def run(limit):
        params = [torch.nn.Parameter(s.bfloat16()) for s in starts]
        opt = MasterWeightAdamW(params, lr=1e-3, weight_decay=0.01, upcast_elements=limit)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).bfloat16()
            opt.step()
        return [opt.state[p]["master"] for p in params]

    sizes = []
    real = precision.adamw
    monkeypatch.setattr(precision, "adamw", lambda masters, grads, *a, **k: (sizes.append(sum(g.numel() for g in grads)),
                                                                            real(masters, grads, *a, **k))[1])
    bounded = run(1100)
    assert max(sizes) <= 2048 + 16 and len(sizes) == 3 * len(element_groups(starts, 1100)) > 3
    sizes.clear()
    whole = run(10 ** 9)
    assert sizes == [sum(s.numel() for s in starts)] * 3
    for a, b in zip(bounded, whole):
        assert torch.equal(a, b)


def test_element_groups_keep_order_and_limit():
    tensors = [torch.empty(n) for n in (5, 5, 20, 1, 1, 9)]
    assert element_groups(tensors, 10) == [[0, 1], [2], [3, 4], [5]]
    assert element_groups([], 10) == []


def test_memory_plan_counts_weights_gradients_and_adam_state():
    model = torch.nn.Linear(1000, 1000, bias=False)  # 1M parameters
    n = 10 ** 6
    plain = memory_plan(model, parse(TrainArguments, []), 1, None)
    assert (plain.weights, plain.gradients, plain.optimizer, plain.transient) == (4 * n, 4 * n, 8 * n, 0)
    low = memory_plan(model.bfloat16(), parse(TrainArguments, ["--bf16_weights", "yes"]), 1, None)
    assert (low.weights, low.gradients, low.optimizer, low.transient) == (2 * n, 2 * n, 12 * n, 4 * n)
    zero3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    sharded = memory_plan(model.float(), parse(TrainArguments, []), 8, zero3)
    assert (sharded.weights, sharded.gradients, sharded.optimizer) == (2 * n // 8, 2 * n // 8, 12 * n // 8)
    assert "per rank of 8 under ZeRO-3" in sharded.line() and "optimizer" in sharded.where


# ---------------------------------------------------------------- --device N trains on GPU N

DEVICE_PROBE = r"""
import json, os, sys
import torch

seen = []  # CUDA_VISIBLE_DEVICES at every CUDA query: the first one fixes what the process sees
def query(result):
    def fake(*args, **kwargs):
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return result
    return fake

torch.cuda.is_available = query(True)
torch.cuda.device_count = query(1)           # one GPU visible: the one named
torch.cuda._raw_device_count_nvml = query(4)  # four on the machine
torch.cuda.set_device = lambda device: None

import distributed
from args import TrainArguments
import run_trainer  # the script's own imports (args, distributed) query nothing at import time

def capture(args):
    print(json.dumps({"first_query": seen[0] if seen else None, "device": str(distributed.device()),
                      "queries_before_run": len(seen)}))

sys.modules["probe"] = sys.modules["__main__"]
sys.argv = ["run_trainer.py", "--device", sys.argv[1]]
distributed.script_main(TrainArguments, "probe:capture", relaunch=True)()
"""


@pytest.mark.parametrize("device,expected", [("3", "3")])
def test_device_n_is_made_visible_before_cuda_is_asked_anything(device, expected):
    result = subprocess.run([sys.executable, "-c", DEVICE_PROBE, device], cwd=ROOT, capture_output=True, text=True,
                            env={**dict(__import__("os").environ), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["first_query"] == expected and found["device"] == "cuda:0"


def test_a_gpu_the_machine_lacks_is_one_error_line():
    probe = DEVICE_PROBE.replace('sys.argv[1]]', '"7"]')
    result = subprocess.run([sys.executable, "-c", probe, "7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device: GPU 7 does not exist here (4 GPUs)"]
