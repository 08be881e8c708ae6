"""One training step: shared-prefix loss (`shared_step.compute_tailored_loss`) vs the seed's five forwards.

Both steps (loss + backward + AdamW step) run side by side in this process on the same batch
and the same model: warm-up, then timed rounds that alternate which variant goes first.
Steps/s come from the median round; the speed-up is also given as the median of the per-round
ratios (adjacent rounds share the machine's load, which matters on a busy 2-core box).
Default: the embedded student architecture (GPT-J, n_layer 4, n_embd 128, vocab 512, random
init or --load), 8 wordmath rows with teacher rationales, a distinct positive and a negative
each (--triplet_share < 1 masks some rows out, as rows without a negative are in real runs),
`--mle weight --contrastive yes --cl_repr last` (the README run).

Peak memory, honestly per variant:
  both: bytes of activations autograd saves for backward in one step (saved_tensors_hooks,
        unique storages, parameters excluded);
  cpu:  the peak RSS gain of 3 steps of that variant in a fresh child process running this
        same command (kernel high-water mark reset via /proc/self/clear_refs after setup and
        one warm step; glibc malloc set to unmap freed tensors), so no memory freed by the
        other variant or kept by the heap hides a peak;
  cuda: torch.cuda.max_memory_allocated during the variant's steps, above the memory held
        before them (weights, optimizer state: both variants have stepped once before).

  python bench/bench_train_step.py                                  # CPU, embedded student
  python bench/bench_train_step.py --fewshot                        # prompts with 3 demos
  python bench/bench_train_step.py --device cuda --config 1.3b      # GPT-J 1.3B-class, bf16, MFU
With --config 1.3b it also reports tokens/s and MFU = 6 * N * text tokens/s / peak FLOP/s
(N = parameters without the input embedding table; text tokens = non-pad prompt+continuation
tokens of the batch, the tokens the step trains on; --peak_flops default: H100 SXM dense bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the five-forward reference
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTJConfig, GPTJForCausalLM  # noqa: E402

import student  # noqa: E402
import tasks  # noqa: E402
from losses import LossConfig  # noqa: E402
from reference import FivePassCollator, five_pass_loss  # noqa: E402  (tests/reference.py)
from hf_internals import enable_checkpointing  # noqa: E402
from shared_step import compute_tailored_loss  # noqa: E402
from train_batches import TailoredCollator, TailoredDataset  # noqa: E402
from train_data import build_train_data  # noqa: E402

CONFIGS = {
    "student": dict(n_layer=4, n_embd=128, n_head=4, rotary_dim=16),
    "1.3b": dict(n_layer=24, n_embd=2048, n_head=16, rotary_dim=64, vocab_size=50400),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8),  # smoke test of the --config path
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default="student", choices=sorted(CONFIGS))
    p.add_argument("--load", default=None, help="HF folder of a student (overrides --config)")
    p.add_argument("--task", default="wordmath")
    p.add_argument("--data_dir", default="localdataset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fewshot", action="store_true", help="prompts carry the task's demos (--fewshot yes)")
    p.add_argument("--triplet_share", type=float, default=1.0,
                   help="share of batch rows with a positive and a negative (the others are masked out)")
    p.add_argument("--mle", default="weight")
    p.add_argument("--cl_repr", default="last")
    p.add_argument("--cl_anchor", default="full", choices=["full", "detached"],
                   help="full: the anchor comes from the LM forward (the sharing this bench measures); "
                        "detached: re-read on the prompt, the original's gradient and run_trainer.py's default")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "autocast"],
                   help="fp32, pure bf16 weights, or bf16 autocast over fp32 weights "
                        "(default: fp32 on cpu, bf16 for --config 1.3b, autocast otherwise on cuda)")
    p.add_argument("--attn_implementation", default=None, choices=["eager", "sdpa", "flash_attention_2"],
                   help="attention kernel (default: transformers' choice, sdpa where the architecture has it)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint every decoder layer (both steps)")
    p.add_argument("--lm_loss_impl", default="logits", choices=["logits", "chunked"],
                   help="LM loss of the shared step from full logits or chunk by chunk through the head")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps_per_round", type=int, default=1)
    p.add_argument("--memory_steps", type=int, default=3)
    p.add_argument("--peak_flops", type=float, default=989e12, help="peak bf16 FLOP/s (H100 SXM dense: 989e12)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    return p.parse_args()


# ---------------------------------------------------------------- model and batch

def make_tokenizer_and_model(args, train: list[tasks.Example]):
    if args.load:
        return AutoTokenizer.from_pretrained(args.load), AutoModelForCausalLM.from_pretrained(args.load)
    task = tasks.get_task(args.task)
    texts = [tasks.build_prompt(task, ex) + tasks.continuation(task, ex, ex.rationale) for ex in train if ex.rationale]
    tokenizer = student.train_tokenizer(texts, 512)
    cfg = dict(CONFIGS[args.config])
    cfg.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_positions=2048, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       tie_word_embeddings=False, **cfg))
    return tokenizer, model


def teacher_files(task: tasks.TaskSpec, train: list[tasks.Example], folder: Path) -> tuple[str, str]:
    """Offline stand-ins: two teacher phrasings per question (positives) and two wrong student rationales."""
    steps = {ex.question: re.sub(r"\s*Therefore, the answer is [^.]*\.$", "", tasks.fold(ex.rationale)) for ex in train}
    teacher = {ex.question: [f"{steps[ex.question]} Therefore, the answer is {ex.gold}.",
                             f"Let us think step by step. {steps[ex.question]} Therefore, the answer is {ex.gold}."]
               for ex in train}
    wrong = {ex.question: [f"{steps[ex.question]}\nAnswer: {int(ex.gold) + 1}",
                           f"{steps[ex.question].rsplit(' ', 2)[0]}\nAnswer: {int(ex.gold) + 7}"] for ex in train}
    (folder / "teacher.json").write_text(json.dumps(teacher))
    (folder / "neg.json").write_text(json.dumps(wrong))
    return str(folder / "teacher.json"), str(folder / "neg.json")


def make_batches(args, tokenizer, device) -> tuple[dict, dict, int]:
    task = tasks.get_task(args.task)
    train = [ex for ex in tasks.load_split(args.task, "train", args.data_dir, limit=8 * args.batch) if ex.rationale]
    demos = tasks.load_demos(task, True, train=train, seed=0) if args.fewshot else ""
    with tempfile.TemporaryDirectory() as tmp:
        teacher, neg = teacher_files(task, train[:4 * args.batch], Path(tmp))
        data = build_train_data(task, train, tokenizer, teacher_data=teacher, demos=demos, max_length=1024,
                                cl_pos_path=teacher, cl_neg_path=neg)
    dataset = TailoredDataset(data, seed=0)
    picked, questions = [], set()
    for i in range(len(dataset)):  # one row per question, each with a triplet
        f = dataset[i]
        if f["qid"] not in questions and f["pos_ids"] is not None:
            picked.append(f)
            questions.add(f["qid"])
        if len(picked) == args.batch:
            break
    without = args.batch - round(args.triplet_share * args.batch)  # these rows lose their triplet
    picked = picked[:args.batch - without] + [dict(f, pos_ids=None, neg_ids=None) for f in picked[args.batch - without:]]
    collate = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, contrastive=True)
    ours = {k: v.to(device) if torch.is_tensor(v) else v for k, v in TailoredCollator(**collate)(picked).items()}
    five = {k: v.to(device) for k, v in FivePassCollator(**collate)(picked).items()}
    text_tokens = sum(len(f["prefix_ids"]) + len(f["cont_ids"]) for f in picked)
    return ours, five, text_tokens


# ---------------------------------------------------------------- steps and measurements

class SavedForBackward:
    """Bytes of unique non-parameter storages autograd saves for backward inside the context."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def make_step(name: str, model, optimizer, batch: dict, cfg: LossConfig, autocast):
    loss_fn = compute_tailored_loss if name == "shared" else five_pass_loss

    def step(saved: SavedForBackward | None = None) -> float:
        with autocast(), (saved or nullcontext()):
            loss, _ = loss_fn(model, batch, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_peak_here(step, steps: int, model) -> dict:
    """Peak RSS gain over `steps` steps in this (fresh) process: the kernel's high-water mark is reset first.

    One step runs before the reset, so the optimizer state (the same for both variants) is not counted."""
    import gc
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    start = _proc_status("VmRSS")
    saved = []
    for _ in range(steps):
        saved.append(SavedForBackward(model))
        step(saved[-1])
    return {"peak_rss_gain": _proc_status("VmHWM") - start, "saved_bytes": max(s.nbytes for s in saved)}


def cpu_peak_in_child(name: str, steps: int) -> dict:
    """The same command in a fresh process that measures one variant only.

    A fresh process, not a fork: OpenMP thread pools do not survive fork (the child hangs), and a
    process that already ran steps keeps freed allocator memory that would hide the peak. glibc
    malloc gets a fixed mmap threshold, so every tensor above 64 KiB is mapped on allocation and
    unmapped on free: RSS then follows live memory instead of the heap's high-water mark."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, *sys.argv, "--memory_child", name, "--memory_steps", str(steps)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_peak(step, steps: int, model) -> dict:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    saved = []
    for _ in range(steps):
        saved.append(SavedForBackward(model))
        step(saved[-1])
    torch.cuda.synchronize()
    return {"peak_alloc_gain": torch.cuda.max_memory_allocated() - before, "saved_bytes": max(s.nbytes for s in saved)}


def timed(step, n: int, sync) -> float:
    sync()
    started = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("fp32" if args.device == "cpu" else "bf16" if args.config == "1.3b" else "autocast")
    task_train = [ex for ex in tasks.load_split(args.task, "train", args.data_dir, limit=2000) if ex.rationale]
    tokenizer, model = make_tokenizer_and_model(args, task_train)
    model.to(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).train()
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    ours_batch, five_batch, text_tokens = make_batches(args, tokenizer, device)
    cfg = LossConfig(mle=args.mle, contrastive=True, cl_repr=args.cl_repr, cl_anchor=args.cl_anchor,
                     lm_loss_impl=args.lm_loss_impl)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "autocast" else nullcontext)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    steps = {"shared": make_step("shared", model, optimizer, ours_batch, cfg, autocast),
             "five": make_step("five", model, optimizer, five_batch, cfg, autocast)}
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"model: {args.load or args.config} ({n_params / 1e6:.2f}M params w/o input embeddings), {precision}, "
          f"device {device}, {torch.get_num_threads()} threads, batch {args.batch} rows "
          f"({ours_batch['triplet_mask'].sum():.0f} with a triplet), {text_tokens} text tokens "
          f"(prefix width {ours_batch['prefix_ids'].shape[1]}, continuation width {ours_batch['cont_ids'].shape[1]}, "
          f"pos/neg width {ours_batch['contrast_ids'].shape[1]}), mle {args.mle}, cl_repr {args.cl_repr}, "
          f"attention {model.config._attn_implementation}, checkpointing {args.gradient_checkpointing}, "
          f"LM loss {args.lm_loss_impl}", flush=True)

    if args.memory_child:
        print(json.dumps(cpu_peak_here(steps[args.memory_child], args.memory_steps, model)))
        return

    # Values first: both steps compute the same losses on the same weights.
    with torch.no_grad(), autocast():
        a, _ = compute_tailored_loss(model, ours_batch, cfg)
        b, _ = five_pass_loss(model, five_batch, cfg)
    print(f"loss on the same weights: shared {a.item():.6f}  five-pass {b.item():.6f}")

    for _ in range(max(1, args.warmup)):  # also creates the optimizer state before any memory is measured
        for step in steps.values():
            step()
    memory = {name: (cpu_peak_in_child(name, args.memory_steps) if device.type == "cpu"
                     else cuda_peak(step, args.memory_steps, model)) for name, step in steps.items()}
    seconds = {name: [] for name in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds[name].append(timed(steps[name], args.steps_per_round, sync) / args.steps_per_round)

    # Adjacent shared/five rounds see the same machine load: their ratio is robust to load bursts.
    paired = statistics.median(f / s for f, s in zip(seconds["five"], seconds["shared"]))
    results = {"args": vars(args), "precision": precision, "text_tokens_per_step": text_tokens,
               "params_without_input_embeddings": n_params, "paired_speedup": paired}
    for name in steps:
        per_step = statistics.median(seconds[name])
        tokens_per_s = text_tokens / per_step
        results[name] = {"steps_per_s": 1 / per_step, "s_per_step_all": seconds[name], "tokens_per_s": tokens_per_s,
                         "mfu": 6 * n_params * tokens_per_s / args.peak_flops, **memory[name]}
    label = {"shared": "shared-prefix (ours)", "five": "five-forward (seed)"}
    mem_key = "peak_rss_gain" if device.type == "cpu" else "peak_alloc_gain"
    for name in steps:
        r = results[name]
        line = (f"{label[name]:22s} {r['steps_per_s']:7.2f} steps/s  {r['tokens_per_s']:9.0f} text tok/s  "
                f"peak {'RSS' if device.type == 'cpu' else 'alloc'} +{r[mem_key] / 2**20:7.1f} MiB  "
                f"saved for backward {r['saved_bytes'] / 2**20:7.1f} MiB")
        if args.config == "1.3b" or device.type == "cuda":
            line += f"  MFU {100 * r['mfu']:.1f}%"
        print(line)
    speedup = results["shared"]["steps_per_s"] / results["five"]["steps_per_s"]
    results["speedup"] = speedup
    print(f"speed-up {speedup:.2f}x steps/s (median of per-round ratios {paired:.2f}x); peak memory ratio (shared / five) "
          f"{results['shared'][mem_key] / max(1, results['five'][mem_key]):.2f}, saved-for-backward ratio "
          f"{results['shared']['saved_bytes'] / max(1, results['five']['saved_bytes']):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
