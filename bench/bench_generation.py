"""Evaluation throughput: our batched generation vs a seed-style loop, side by side in one process.

Seed-style = what the original's infer.py did: fixed batch 4 in dataset order, plain
`model.generate` until eos or max_new_tokens (its stop token was silently None), cut afterwards.
Ours = generation.generate: length-sorted batches of --batch, each sequence stopping at the
blank line; with few-shot prompts twice, without and with the shared-demos KV cache
(SamplingConfig.prefix_cache). All greedy on the same prompts; we report problems/s, the ratios,
and how many items' outputs differ (seed-style vs ours: left padding differs between the two
batchings, which may flip a rare tie; the prefix cache vs ours without it: should be none).

    python bench/bench_generation.py --load checkpoints/wordmath-student --limit 300
    python bench/bench_generation.py --load checkpoints/wordmath-student --fewshot            # 3 demos
    python bench/bench_generation.py --load checkpoints/wordmath-student --fewshot --demos 6  # longer prompts
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from generation import STOP, SamplingConfig, encode_ids, generate, prompt_limit  # noqa: E402
from model_loading import load_model  # noqa: E402
from prefix_cache import build_shared_prefix  # noqa: E402
from tasks import BOUNDARY, build_prompt, get_task, load_demos, load_split  # noqa: E402


@torch.no_grad()
def seed_style(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 4) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        # the boundary space off, as ours records it: the comparison is about the generated tokens
        outputs.extend(t.split(STOP, 1)[0].removeprefix(BOUNDARY) for t in texts)
    return outputs


def run_interleaved(variants: dict, prompts: list[str], chunk: int) -> dict[str, tuple[list[str], float]]:
    """Each variant on every chunk of `chunk` prompts (0: all at once), the variants' order rotating from
    chunk to chunk, so that load from other processes in the middle of a run falls on all of them alike.
    Returns each variant's outputs (prompt order) and its total seconds."""
    chunk = chunk or len(prompts)
    results = {name: ([], 0.0) for name in variants}
    names = list(variants)
    for c, start in enumerate(range(0, len(prompts), chunk)):
        part = prompts[start:start + chunk]
        for name in names[c % len(names):] + names[:c % len(names)]:
            started = time.perf_counter()
            outputs = variants[name](part)
            outs, seconds = results[name]
            results[name] = (outs + outputs, seconds + time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="checkpoints/wordmath-student")
    parser.add_argument("--task", default="wordmath")
    parser.add_argument("--data_dir", default="localdataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fewshot", action="store_true", help="prepend train-split demos (longer prompts)")
    parser.add_argument("--demos", type=int, default=None, help="with --fewshot: this many demos (default: the task's)")
    parser.add_argument("--skip_seed", action="store_true", help="leave out the (slow) seed-style loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="time the variants on chunks of N prompts in rotating order (a busy machine); "
                             "0: each on all prompts in one call, as infer.py")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task(args.task)
    examples = load_split(task.name, args.split, args.data_dir, args.limit)
    demos, n_demos = "", 0
    if args.fewshot:
        n_demos = args.demos or task.n_demos
        demos = load_demos(dataclasses.replace(task, n_demos=n_demos), True,
                           train=load_split(task.name, "train", args.data_dir))
    prompts = [build_prompt(task, ex, demos) for ex in examples]
    model, tokenizer = load_model(args.load)
    torch.manual_seed(0)
    plain_cfg = SamplingConfig(task.max_new_tokens, batch_size=args.batch, prefix_cache=False)
    cached_cfg = dataclasses.replace(plain_cfg, prefix_cache=True)
    ids = encode_ids(tokenizer, prompts, prompt_limit(model, plain_cfg))
    prefix = build_shared_prefix(model, ids)
    lengths = sorted(map(len, ids))
    print(f"{len(prompts)} {task.name}/{args.split} prompts ({n_demos} demos), prompt tokens {lengths[0]}-{lengths[-1]} "
          f"(median {lengths[len(lengths) // 2]}), shared prefix {prefix.length if prefix else 0} tokens"
          f"{'' if prefix else ' (none cached)'}, max_new_tokens {task.max_new_tokens}, {torch.get_num_threads()} "
          f"threads, {'chunks of ' + str(args.chunk) if args.chunk else 'one call each'}, model {args.load}")

    for cfg in (plain_cfg, cached_cfg):  # warm-up
        generate(model, tokenizer, prompts[:8], dataclasses.replace(cfg, batch_size=8), progress=False)
    seed_name, plain_name, cached_name = ("seed-style (batch 4, unsorted, no stop)",
                                          f"ours (batch {args.batch}, sorted, stop at blank line)",
                                          "ours + shared-prefix KV cache")
    variants = {}
    if not args.skip_seed:
        variants[seed_name] = lambda part: seed_style(model, tokenizer, part, task.max_new_tokens)
    variants[plain_name] = lambda part: [o[0] for o in generate(model, tokenizer, part, plain_cfg, progress=False)]
    if prefix:  # without a shared prefix the cached variant runs the plain path
        variants[cached_name] = lambda part: [o[0] for o in generate(model, tokenizer, part, cached_cfg, progress=False)]
    runs = run_interleaved(variants, prompts, args.chunk)

    plain = runs[plain_name][0]
    for name, (outputs, seconds) in runs.items():
        print(f"{name:45s} {len(prompts) / seconds:8.2f} problems/s ({seconds:6.1f} s), outputs differing from "
              f"ours without the cache: {sum(a != b for a, b in zip(outputs, plain))}/{len(prompts)}")
    seconds = {name: s for name, (_, s) in runs.items()}
    for name in runs:
        if name != seed_name and seed_name in runs:
            print(f"speed-up {name} vs seed-style: {seconds[seed_name] / seconds[name]:.2f}x"
                  + (" (target >= 3x)" if name == cached_name else ""))
    if cached_name in runs:
        print(f"speed-up of the prefix cache vs ours without it: {seconds[plain_name] / seconds[cached_name]:.2f}x")


if __name__ == "__main__":
    main()
