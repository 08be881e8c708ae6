"""Warm-start steps of the embedded student (batch 32 of real wordmath rows, as `build_student.py`) with
GPT-J's `gelu_new` (the stock GPT-J config: the baseline) and with `gelu_pytorch_tanh` (the same function,
one fused kernel: what `student.build_model` now uses), side by side in one process, alternating.

    python bench/bench_warm_start.py [--steps 15] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.activations import ACT2FN  # noqa: E402

import student  # noqa: E402
from tasks import build_prompt, continuation, get_task, load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="localdataset")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    task = get_task("wordmath")
    train = load_split("wordmath", "train", args.data_dir)
    pairs = [(build_prompt(task, ex), continuation(task, ex, ex.rationale)) for ex in train if ex.rationale][:2000]
    tokenizer = student.train_tokenizer([p + c for p, c in pairs], 512)
    seconds: dict[str, list[float]] = {"gelu_new": [], "gelu_pytorch_tanh": []}
    for _ in range(args.repeats):
        for activation in seconds:
            model = student.build_model(tokenizer, seed=0)
            model.config.activation_function = activation
            for block in model.transformer.h:  # the MLPs were built with the config's activation
                block.mlp.act = ACT2FN[activation]
            start = time.perf_counter()
            student.warm_start(model, tokenizer, pairs, args.steps, 32, 2e-3, 0, log_every=10**9)
            seconds[activation].append((time.perf_counter() - start) / args.steps)
    base, ours = min(seconds["gelu_new"]), min(seconds["gelu_pytorch_tanh"])
    print(f"warm-start step, batch 32: gelu_new {base * 1000:.0f} ms, gelu_pytorch_tanh {ours * 1000:.0f} ms "
          f"-> {base / ours:.2f}x (best of {args.repeats} alternating runs of {args.steps} steps)")


if __name__ == "__main__":
    main()
