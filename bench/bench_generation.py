"""Evaluation throughput: our batched generation vs a seed-style loop, side by side in one process.

Seed-style = what the original's infer.py did: fixed batch 4 in dataset order, plain
`model.generate` until eos or max_new_tokens (its stop token was silently None), cut afterwards.
Ours = generation.generate: length-sorted batches of --batch, each sequence stopping at the
blank line. Both greedy on the same prompts; we report problems/s, the ratio, and how many
items' outputs differ (left padding differs between the two batchings, which may flip a rare tie).

    python bench/bench_generation.py --load checkpoints/wordmath-student --limit 300
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from generation import STOP, SamplingConfig, generate, load_model  # noqa: E402
from tasks import build_prompt, get_task, load_split  # noqa: E402


@torch.no_grad()
def seed_style(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 4) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        outputs.extend(t.split(STOP, 1)[0] for t in texts)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="checkpoints/wordmath-student")
    parser.add_argument("--task", default="wordmath")
    parser.add_argument("--data_dir", default="localdataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fewshot", action="store_true", help="prepend 3 train-split demos (longer prompts)")
    args = parser.parse_args()

    task = get_task(args.task)
    examples = load_split(task.name, args.split, args.data_dir, args.limit)
    demos = ""
    if args.fewshot:
        from tasks import load_demos
        demos = load_demos(task, True, train=load_split(task.name, "train", args.data_dir))
    prompts = [build_prompt(task, ex, demos) for ex in examples]
    model, tokenizer = load_model(args.load)
    torch.manual_seed(0)
    print(f"{len(prompts)} {task.name}/{args.split} prompts, max_new_tokens {task.max_new_tokens}, "
          f"{torch.get_num_threads()} threads, model {args.load}")

    generate(model, tokenizer, prompts[:8], SamplingConfig(task.max_new_tokens, batch_size=8), progress=False)  # warm-up
    started = time.perf_counter()
    seed_outputs = seed_style(model, tokenizer, prompts, task.max_new_tokens)
    seed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = [o[0] for o in generate(model, tokenizer, prompts, SamplingConfig(task.max_new_tokens, batch_size=args.batch),
                                   progress=False)]
    our_seconds = time.perf_counter() - started

    differ = sum(a != b for a, b in zip(seed_outputs, ours))
    same = 1 - differ / len(prompts)
    print(f"seed-style (batch 4, unsorted, no stop): {len(prompts) / seed_seconds:7.2f} problems/s ({seed_seconds:.1f} s)")
    print(f"ours (batch {args.batch}, sorted, stop at blank line): {len(prompts) / our_seconds:7.2f} problems/s "
          f"({our_seconds:.1f} s)")
    print(f"speed-up: {seed_seconds / our_seconds:.2f}x (target >= 4x)")
    print(f"identical greedy outputs: {len(prompts) - differ}/{len(prompts)} ({100 * same:.1f}%, target >= 99%)")


if __name__ == "__main__":
    main()
