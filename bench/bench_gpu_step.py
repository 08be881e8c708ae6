"""GPU training-step benchmark at real scale: the stock HF step, our LM-only step, our shared step and the
five-forward reference, with and without the throughput switches, and run_trainer.py itself.

Model: a Llama-style 1.3B config (24 layers, hidden 2048, 16 heads, MLP 5632, vocab 32000, untied: 1.30B
parameters without the input embedding), or GPT-J 1.3B (--arch gptj), random init. Data: synthetic
GSM8K-like few-shot rows built through the real pipeline (task files, teacher rationales, negatives,
`build_train_data`, the unique-question batch sampler): prompt ~940 tokens (demos + question),
continuation ~250, a positive and a negative ~250 each for every row; batch 16. One byte is one token
(the tokenizer has no merges to speak of), so lengths are what the text says.

Variants, each on the same batches in this process:
  stock   model(input_ids, attention_mask, labels=...) + backward + step: HF's own loss over full logits
  lm      compute_tailored_loss, LM loss only (--contrastive no)
  shared  compute_tailored_loss with the self-reflection loss (--contrastive yes, --cl_anchor detached)
  five    tests/reference.five_pass_loss: the original's five forwards
Switch sets (--sets):
  plain   what run_trainer.py --bf16 did before the switches: fp32 weights under bf16 autocast, sdpa,
          full logits, fused AdamW, no checkpointing, no compilation
  fast    --bf16_weights (bf16 weights, fp32 masters in a fused AdamW) --lm_loss_impl chunked
          --gradient_checkpointing --torch_compile (--pad_to_multiple_of 64)
  fast_nockpt, fast_nocompile, fast_eager: fast without checkpointing / compilation / with eager attention
Then run_trainer.py (--trainer_sets, default fast) for --trainer_steps steps in a subprocess; its steady
state is read from the TensorBoard wall times of its logs (start-up, the first --trainer_skip steps and
the final save excluded).

Reported per variant: step time, text tokens/s (real prompt + continuation tokens), two MFUs against the
card's measured bf16 matmul peak (an 8192^3 matmul, timed here; the datasheet dense bf16 peak is shown too):
  MFU text     6 x N x text tokens/s / peak
  MFU trained  6 x N x trained tokens/s / peak, over every token the step runs forward and backward: the
               text, plus for the shared step the anchor (re-read with --cl_anchor detached), the positive and
               the negative of every triplet row (~1.6x the text), plus, for the five-forward step, its no-grad
               prefix forward at a third of a token each (2N instead of 6N FLOPs)
peak memory (max_memory_allocated, weights and optimizer state included), and the compiled graphs of each
set (dynamo's unique_graphs; with compilation they must not grow with the model's depth). The versions of
torch, transformers and CUDA are printed and kept in --json.

  python bench/bench_gpu_step.py                         # H100/H200: every variant, sets plain and fast
  python bench/bench_gpu_step.py --arch gptj --batch 8   # the GPT-J 1.3B memory target
  python bench/bench_gpu_step.py --smoke                 # tiny config on CPU (default without CUDA)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import student  # noqa: E402
import tasks  # noqa: E402
from losses import LossConfig  # noqa: E402
from reference import FivePassCollator, five_pass_loss  # noqa: E402  (tests/reference.py)
from hf_internals import enable_checkpointing  # noqa: E402
from shared_step import compute_tailored_loss  # noqa: E402
from train_batches import TailoredCollator, TailoredDataset, UniqueQuestionBatchSampler  # noqa: E402
from train_data import build_train_data  # noqa: E402
from precision import MasterWeightAdamW  # noqa: E402
from speed import bucket_batch, compile_layers  # noqa: E402

ARCHS = {
    "llama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "gptj": dict(n_layer=24, n_embd=2048, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048,
                 tie_word_embeddings=False),
}
SMOKE_ARCHS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
    "gptj": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=512, n_positions=512, tie_word_embeddings=False),
}
SETS = {  # name: (bf16 weights, chunked LM loss, checkpointing, compile, attention)
    "plain": (False, False, False, False, "sdpa"),
    "fast": (True, True, True, True, "sdpa"),
    "fast_nockpt": (True, True, False, True, "sdpa"),
    "fast_nocompile": (True, True, True, False, "sdpa"),
    "fast_eager": (True, True, True, True, "eager"),
}
VARIANTS = ("stock", "lm", "shared", "five")
# Datasheet dense bf16 peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
DATASHEET = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12))
WORDS = ("apples pencils marbles books coins boxes each costs dollars more fewer than twice half of the total "
         "after gives buys sells finds loses week day store friend sister brother has had left how many").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU (automatic without CUDA)")
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 16; smoke 2)")
    p.add_argument("--prefix_tokens", type=int, default=None, help="mean prompt length (default 940; smoke 96)")
    p.add_argument("--cont_tokens", type=int, default=None, help="mean continuation length (default 250; smoke 32)")
    p.add_argument("--sets", default="plain,fast", help=f"switch sets, of {','.join(SETS)}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3: compilation; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; smoke 2)")
    p.add_argument("--trainer_sets", default=None, help="switch sets run through run_trainer.py (default fast; '' none)")
    p.add_argument("--trainer_steps", type=int, default=None, help="run_trainer.py steps (default 40; smoke 4)")
    p.add_argument("--trainer_skip", type=int, default=None, help="steps left out as start-up (default 10; smoke 1)")
    p.add_argument("--workdir", default=None, help="keep the synthetic data and model here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.smoke = args.smoke or not torch.cuda.is_available()
    small = args.smoke
    defaults = dict(batch=(2, 16), prefix_tokens=(96, 940), cont_tokens=(32, 250), warmup=(1, 3), steps=(2, 10),
                    trainer_steps=(4, 40), trainer_skip=(1, 10))
    for name, (smoke, real) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else real)
    if args.trainer_sets is None:
        args.trainer_sets = "fast"
    args.sets = [s for s in args.sets.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    args.trainer_sets = [s for s in args.trainer_sets.split(",") if s]
    for name in args.sets + args.trainer_sets:
        if name not in SETS:
            p.error(f"unknown switch set {name!r} (known: {', '.join(SETS)})")
    return args


# ---------------------------------------------------------------- synthetic GSM8K-like data

def sentence(rng: random.Random, chars: int) -> str:
    out = []
    while sum(map(len, out)) + len(out) < chars:
        out.append(str(rng.randint(2, 99)) if rng.random() < 0.2 else rng.choice(WORDS))
    return " ".join(out)


def write_task(folder: Path, args, questions: int, scale: tuple[float, float] = (1.0, 1.0), seed: int = 0) -> dict:
    """gsm8k-format train split, teacher rationales (two per question: continuation and positive),
    a wrong rationale per question (negative), and a demo file. `scale` (prompt, continuation) corrects
    the character counts towards the wanted token counts (see calibrated_data)."""
    rng = random.Random(seed)
    prefix_chars, cont_chars = args.prefix_tokens * scale[0], args.cont_tokens * scale[1]
    question_chars = max(16, int(prefix_chars) // 16)
    rows, teacher, negatives = [], {}, {}
    for i in range(questions):
        gold = rng.randint(2, 500)
        q = f"Q{i}: {sentence(rng, question_chars)}?"
        body = lambda: sentence(rng, int(cont_chars * rng.uniform(0.85, 1.15)))  # noqa: E731
        rows.append({"question": q, "answer": f"{body()}\n#### {gold}"})
        teacher[q] = [f"{body()} Therefore, the answer is {gold}.", f"{body()} So the answer is {gold}."]
        negatives[q] = [f"{body()}\nAnswer: {gold + rng.randint(1, 9)}"]
    (folder / "data" / "gsm8k").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "teacher.json").write_text(json.dumps(teacher))
    (folder / "negatives.json").write_text(json.dumps(negatives))
    demo_chars = max(0, int(prefix_chars) - question_chars)
    demos = []
    while sum(map(len, demos)) < demo_chars:
        demos.append(f"Question: {sentence(rng, 60)}?\nReasoning: {sentence(rng, 120)}\nAnswer: {rng.randint(2, 99)}")
    text = "\n\n".join(demos)[:demo_chars].rsplit(" ", 1)[0]
    (folder / "demos.txt").write_text(text + "\n")
    return dict(data_dir=str(folder / "data"), teacher=str(folder / "teacher.json"),
                negatives=str(folder / "negatives.json"), demos=str(folder / "demos.txt"))


def make_tokenizer(files: dict):
    """Byte-level BPE without merges (256 bytes + 2 specials): one ASCII character is one token."""
    task = tasks.get_task("gsm8k")
    examples = tasks.load_split("gsm8k", "train", files["data_dir"])
    demos = Path(files["demos"]).read_text()
    texts = [demos + tasks.build_prompt(task, ex) + tasks.continuation(task, ex, ex.rationale) for ex in examples[:64]]
    return student.train_tokenizer(texts, vocab_size=258)


def calibrated_data(work: Path, args, questions: int):
    """Task files, tokenizer and training rows whose mean prompt and continuation lengths are the wanted
    token counts: written once, measured, and written again with the character counts corrected."""
    scale = (1.0, 1.0)
    for _ in range(2):
        files = write_task(work, args, questions, scale)
        tokenizer = make_tokenizer(files)
        data = train_data(files, tokenizer, max_length=2048)
        prefix = statistics.mean(len(r.prefix_ids) for r in data.rows)
        cont = statistics.mean(len(r.cont_ids) for r in data.rows)
        scale = (scale[0] * args.prefix_tokens / prefix, scale[1] * args.cont_tokens / cont)
    return files, tokenizer, data, prefix, cont


def train_data(files: dict, tokenizer, max_length: int):
    task = tasks.get_task("gsm8k")
    examples = tasks.load_split("gsm8k", "train", files["data_dir"])
    demos = tasks.load_demos(task, True, files["demos"])
    return build_train_data(task, examples, tokenizer, teacher_data=files["teacher"], demos=demos, max_length=max_length,
                            cl_pos_path=files["teacher"], cl_neg_path=files["negatives"])


# ---------------------------------------------------------------- model, batches, steps

def model_config(args, tokenizer):
    arch = (SMOKE_ARCHS if args.smoke else ARCHS)[args.arch]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(**arch, **ids) if args.arch == "llama" else GPTJConfig(**arch, **ids)


def build_model(config, dtype: torch.dtype, attention: str, device: torch.device):
    torch.manual_seed(0)
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else GPTJForCausalLM
    config._attn_implementation = attention
    with device:
        model = cls(config)
    return model.to(dtype).train()


def counted_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def make_batches(data, tokenizer, args, device, multiple: int) -> list[dict]:
    """The first batches run_trainer.py would train on (same sampler, seed 42), in every variant's layout."""
    dataset = TailoredDataset(data, seed=42)
    sampler = UniqueQuestionBatchSampler(dataset.row_questions(), args.batch, seed=42)
    ours = TailoredCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive=True)
    five = FivePassCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive=True)
    out, collate_s = [], []
    for indices in sampler.batches()[:max(2, min(8, args.steps))]:
        features = [dataset[i] for i in indices]
        started = time.perf_counter()
        batch = ours(features)
        if multiple > 1:
            batch = bucket_batch(batch, multiple, tokenizer.pad_token_id)
        collate_s.append(time.perf_counter() - started)
        reference = five(features)
        labels = reference["full_ids"].masked_fill(reference["full_mask"] == 0, -100)
        stock = dict(input_ids=reference["full_ids"], attention_mask=reference["full_mask"], labels=labels)
        move = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
        text = sum(len(f["prefix_ids"]) + len(f["cont_ids"]) for f in features)
        triplets = [f for f in features if f["pos_ids"] is not None and f["neg_ids"] is not None]
        contrast = sum(len(f["cont_ids"]) + len(f["pos_ids"]) + len(f["neg_ids"]) for f in triplets)  # anchor, pos, neg
        prefixes = sum(len(f["prefix_ids"]) for f in triplets)
        out.append(dict(ours=move(batch), five=move(reference), stock=move(stock), tokens=text,
                        trained={"stock": text, "lm": text, "shared": text + contrast, "five": text + contrast + prefixes / 3}))
    return out, statistics.median(collate_s)


def loss_of(variant: str, model, batch: dict, chunked: bool):
    impl = "chunked" if chunked else "logits"
    if variant == "stock":
        return model(**batch["stock"]).loss
    if variant == "lm":
        return compute_tailored_loss(model, batch["ours"], LossConfig(lm_loss_impl=impl))[0]
    if variant == "shared":
        return compute_tailored_loss(model, batch["ours"], LossConfig(contrastive=True, lm_loss_impl=impl))[0]
    return five_pass_loss(model, batch["five"], LossConfig(contrastive=True))[0]


def measured_peak(device: torch.device) -> float | None:
    """bf16 matmul FLOP/s of this card (8192^3, best of 3 runs of 10)."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 * 10 / best


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in DATASHEET if key in name), None)


def run_set(name: str, args, config, batches, device, n_params_holder: dict) -> dict:
    bf16_weights, chunked, checkpointing, compiled, attention = SETS[name]
    if compiled and device.type != "cuda":
        compiled = False  # inductor's C++ builds take minutes on a CPU: the smoke run skips them
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    model = build_model(config, dtype, attention, device)
    n_params_holder["n"] = counted_params(model)
    if checkpointing:
        enable_checkpointing(model)
    if compiled:
        compile_layers(model)
    if bf16_weights:
        optimizer = MasterWeightAdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=cuda)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not bf16_weights else nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = {}
    for variant in args.variants:
        oom = False
        def step(batch):
            with autocast():
                loss = loss_of(variant, model, batch, chunked)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        try:
            for i in range(args.warmup):
                step(batches[i % len(batches)])
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            tokens = trained = 0
            started = time.perf_counter()
            for i in range(args.steps):
                batch = batches[i % len(batches)]
                step(batch)
                tokens += batch["tokens"]
                trained += batch["trained"][variant]
            sync()
            seconds = (time.perf_counter() - started) / args.steps
            results[variant] = dict(step_s=seconds, tokens_per_s=tokens / args.steps / seconds,
                                    trained_tokens_per_s=trained / args.steps / seconds,
                                    peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # outside the handler: its traceback no longer holds the failed step's tensors
            optimizer.zero_grad(set_to_none=True)
            results[variant] = dict(oom=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        print(f"  {name:14s} {variant:7s} " + describe(results[variant]), flush=True)
    stats = torch._dynamo.utils.counters
    results["graphs"] = dict(unique_graphs=stats["stats"]["unique_graphs"], graph_breaks=sum(stats["graph_break"].values()),
                             recompile_limit_hits=sum(v for k, v in stats["stats"].items() if "limit" in k))
    model = optimizer = None  # this set's weights and state go before the next set's
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


def describe(r: dict) -> str:
    if r.get("oom"):
        return "out of memory"
    memory = f"  peak {r['peak_bytes'] / 2**30:6.1f} GiB" if r.get("peak_bytes") else ""
    return f"{1000 * r['step_s']:8.1f} ms/step  {r['tokens_per_s']:9.0f} text tok/s{memory}"


# ---------------------------------------------------------------- run_trainer.py

def trainer_flags(name: str, cuda: bool) -> list[str]:
    bf16_weights, chunked, checkpointing, compiled, attention = SETS[name]
    flags = ["--attn_implementation", attention, "--lm_loss_impl", "chunked" if chunked else "logits"]
    flags += ["--bf16_weights", "yes"] if bf16_weights else (["--bf16", "yes"] if cuda else [])
    flags += ["--gradient_checkpointing", "yes"] if checkpointing else []
    flags += ["--torch_compile", "yes"] if compiled and cuda else []
    return flags


def steady_state(events_dir: Path, skip: int) -> tuple[float, int] | None:
    """(seconds per step, steps) between the first log at or after step `skip` and the last log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(events_dir.rglob("events.out.tfevents.*"))
    if not files:
        return None
    acc = EventAccumulator(str(files[-1].parent))
    acc.Reload()
    points = sorted((e.step, e.wall_time) for e in acc.Scalars("train/loss"))
    points = [p for p in points if p[0] >= skip]
    if len(points) < 2:
        return None
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (t1 - t0) / (s1 - s0), s1 - s0


def run_trainer(name: str, args, files: dict, model_dir: Path, out: Path, tokens_per_step: float, cuda: bool) -> dict:
    logging = max(1, min(5, args.trainer_skip))
    argv = [sys.executable, "run_trainer.py", "--task", "gsm8k", "--data_dir", files["data_dir"], "--load", str(model_dir),
            "--teacher_data", files["teacher"], "--fewshot", "yes", "--fewshot_file", files["demos"],
            "--contrastive", "yes", "--cl_pos_path", files["teacher"], "--cl_neg_path", files["negatives"],
            "--train_bsz", str(args.batch), "--max_length", "2048", "--lr", "1e-6", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--max_steps", str(args.trainer_steps), "--logging_steps", str(logging),
            "--save_strategy", "no", "--output_dir", str(out), "--device", "0" if cuda else "cpu",
            *trainer_flags(name, cuda)]
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({} if cuda else {"OMP_NUM_THREADS": "1"}))  # as the bare steps here
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-2000:] + result.stderr[-3000:])
        return dict(failed=True, wall_s=wall)
    steady = steady_state(out / "runs", args.trainer_skip)
    if steady is None:
        return dict(failed=True, wall_s=wall, why="no steady-state logs")
    seconds, steps = steady
    return dict(step_s=seconds, steps_timed=steps, tokens_per_s=tokens_per_step / seconds, wall_s=wall)


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return run(args, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="bench_gpu_step_") as work:  # the saved 1.3B model is 5 GB
        return run(args, Path(work))


def run(args, work: Path) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny model: a second thread only waits for a busy core
    questions = max(args.batch * (args.trainer_steps + 2) // 2, 64)  # two rows per question: one epoch at most
    files, tokenizer, data, mean_prefix, mean_cont = calibrated_data(work, args, questions)
    rows = data.rows
    config = model_config(args, tokenizer)
    card, sheet = datasheet_peak(device)
    measured = measured_peak(device)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"device {card}: bf16 matmul peak measured {measured / 1e12:.0f} TFLOP/s, datasheet "
          f"{sheet / 1e12 if sheet else float('nan'):.0f} TFLOP/s" if measured else f"device {card} (smoke run: no MFU)")
    print(f"data: {len(rows)} rows, mean prompt {mean_prefix:.0f} tokens, continuation {mean_cont:.0f}, every row with a "
          f"positive and a negative ({data.counts.get('rows_with_triplet')} of {len(rows)}); batch {args.batch}; "
          f"{'SMOKE (tiny config, CPU): numbers are a smoke check, not measurements' if args.smoke else ''}", flush=True)
    results: dict = {"args": {k: v for k, v in vars(args).items()}, "device": card, "versions": versions(),
                     "measured_peak": measured,
                     "datasheet_peak": sheet, "mean_prefix_tokens": mean_prefix, "mean_cont_tokens": mean_cont,
                     "sets": {}, "trainer": {}}
    holder: dict = {}
    for name in args.sets:
        compiled = SETS[name][3] and device.type == "cuda"
        batches, collate_s = make_batches(data, tokenizer, args, device, 64 if compiled else 1)
        results["sets"][name] = run_set(name, args, config, batches, device, holder)
        results["sets"][name]["collate_ms"] = 1000 * collate_s
    n_params = holder.get("n") or counted_params(build_model(config, torch.float32, "eager", torch.device("meta")))
    results["params_without_input_embedding"] = n_params

    if args.trainer_sets:
        model_dir = work / "model"
        if not (model_dir / "config.json").is_file():  # fp32 on disk: --bf16 loads it as fp32, --bf16_weights as bf16
            build_model(config, torch.float32, "sdpa", torch.device("cpu")).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        tokens_per_step = args.batch * (mean_prefix + mean_cont)
        for name in args.trainer_sets:
            r = run_trainer(name, args, files, model_dir, work / f"trainer_{name}", tokens_per_step, device.type == "cuda")
            results["trainer"][name] = r
            print(f"  {name:14s} run_trainer " + ("failed" if r.get("failed") else
                                                   f"{1000 * r['step_s']:8.1f} ms/step  {r['tokens_per_s']:9.0f} text tok/s "
                                                   f"(steady state over {r['steps_timed']} steps; whole run {r['wall_s']:.0f} s)"),
                  flush=True)

    report(results, n_params)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda or "none"}


def report(results: dict, n_params: int) -> None:
    peak, sheet = results["measured_peak"], results["datasheet_peak"]
    print(f"\nN = {n_params / 1e6:,.1f}M parameters without the input embedding; MFU = 6 N tok/s / measured peak "
          f"(text tokens; trained tokens: every token run forward and backward); sheet: text MFU against the datasheet")
    print(f"{'set':14s} {'variant':11s} {'ms/step':>9s} {'text tok/s':>11s} {'MFU text':>9s} {'MFU trained':>12s} "
          f"{'MFU sheet':>10s} {'peak GiB':>9s}")
    rows = [(s, v, r) for s, rs in results["sets"].items() for v, r in rs.items() if isinstance(r, dict) and v in VARIANTS]
    rows += [(s, "run_trainer", r) for s, r in results["trainer"].items()]
    mfu = lambda rate, of: f"{100 * 6 * n_params * rate / of:.1f}%" if of and rate else "-"  # noqa: E731
    for name, variant, r in rows:
        if r.get("oom") or r.get("failed"):
            print(f"{name:14s} {variant:11s} {'out of memory' if r.get('oom') else 'failed'}")
            continue
        memory = f"{r['peak_bytes'] / 2**30:9.1f}" if r.get("peak_bytes") else f"{'-':>9s}"
        print(f"{name:14s} {variant:11s} {1000 * r['step_s']:9.1f} {r['tokens_per_s']:11.0f} {mfu(r['tokens_per_s'], peak):>9s} "
              f"{mfu(r.get('trained_tokens_per_s'), peak):>12s} {mfu(r['tokens_per_s'], sheet):>10s} {memory}")
    print()
    for name, rs in results["sets"].items():
        stock, lm, shared = (rs.get(v, {}) for v in ("stock", "lm", "shared"))
        graphs = rs.get("graphs", {})
        print(f"{name}: compiled graphs {graphs.get('unique_graphs', 0)}, graph breaks {graphs.get('graph_breaks', 0)}, "
              f"recompile-limit hits {graphs.get('recompile_limit_hits', 0)}")
        if "tokens_per_s" in stock and "tokens_per_s" in lm:
            print(f"{name}: LM-only / stock step = {lm['tokens_per_s'] / stock['tokens_per_s']:.2f}x (target >= 1)")
        if "tokens_per_s" in shared and "tokens_per_s" in rs.get("five", {}):
            print(f"{name}: shared / five-forward = {shared['tokens_per_s'] / rs['five']['tokens_per_s']:.2f}x")
        if "tokens_per_s" in shared and peak:
            print(f"{name}: shared step MFU over trained tokens {mfu(shared['trained_tokens_per_s'], peak)} (target >= 40%), "
                  f"over text tokens {mfu(shared['tokens_per_s'], peak)}")
        print(f"{name}: collation {rs['collate_ms']:.1f} ms per batch on the main thread")
        trainer = results["trainer"].get(name, {})
        if "tokens_per_s" in trainer and "tokens_per_s" in shared:
            print(f"{name}: run_trainer.py / bare shared step = {trainer['tokens_per_s'] / shared['tokens_per_s']:.2f}x "
                  f"(target >= 0.90)")


if __name__ == "__main__":
    main()
