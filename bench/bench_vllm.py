"""Few-shot greedy evaluation and the sampled exam: vLLM against our HF path and the seed-style loop, in one process.

Runs in the vLLM environment (`bash scripts/env.sh --vllm`), whose transformers also runs the HF engine:

    .venv-vllm/bin/python bench/bench_vllm.py --load checkpoints/wordmath-student --task wordmath --demos 8
    .venv-vllm/bin/python bench/bench_vllm.py --load checkpoints/smollm2-135m-instruct --task gsm_symbolic --demos 3

Variants, each on the same prompts (`generation.generate`, as infer.py runs them):
- vllm + prefix caching / vllm without: a fresh `vllm.LLM` each (start-up timed apart from generation);
- hf + prefix cache / hf without: our HF engine (`--prefix_cache yes|no`);
- seed-style: the original's loop (batch 4, dataset order, no stop string; bench_generation.seed_style).
Reported: problems/s on generation alone, start-up seconds, greedy outputs identical to `hf without` (the
reference; `--skip_hf_plain`: HF with the cache), and the peak resident memory of the process and its children (vLLM runs its engine in child
processes) while the variant ran. Then the exam (--exam_samples sampled answers per question) with both engines.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402  (a vLLM dependency)
import torch  # noqa: E402

from bench_generation import seed_style  # noqa: E402
from generation import SamplingConfig, encode_ids, engine_class, generate  # noqa: E402
from tasks import build_prompt, get_task, load_demos, load_split  # noqa: E402


class PeakMemory:
    """Peak resident memory of this process and its descendants, sampled every 50 ms while in the block."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while self.running:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="checkpoints/wordmath-student")
    parser.add_argument("--task", default="wordmath")
    parser.add_argument("--data_dir", default="localdataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--demos", type=int, default=None, help="few-shot demos (default: the task's); sets the prompt length")
    parser.add_argument("--batch", type=int, default=32, help="the HF engine's batch (vLLM batches by itself)")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--exam_limit", type=int, default=50, help="questions in the sampled exam (0: skip it)")
    parser.add_argument("--exam_samples", type=int, default=4)
    parser.add_argument("--skip_seed", action="store_true", help="leave out the (slow) seed-style loop")
    parser.add_argument("--skip_hf_plain", action="store_true",
                        help="leave out the HF engine without its prefix cache (then the reference is HF with it)")
    args = parser.parse_args()

    task = get_task(args.task)
    n_demos = args.demos or task.n_demos
    demos = load_demos(dataclasses.replace(task, n_demos=n_demos), True, train=load_split(task.name, "train", args.data_dir))
    examples = load_split(task.name, args.split, args.data_dir, args.limit)
    prompts = [build_prompt(task, ex, demos) for ex in examples]
    max_new = args.max_new_tokens or task.max_new_tokens
    greedy = SamplingConfig(max_new, batch_size=args.batch)

    results, outputs = {}, {}

    def load(engine: str, prefix_cache: bool):
        started = time.perf_counter()
        model, tokenizer = engine_class(engine).load(args.load, None, "--load", False, False, None, seed=0,
                                                     prefix_cache=prefix_cache)
        return model, tokenizer, time.perf_counter() - started

    def timed(name: str, run, startup: float):
        with PeakMemory() as memory:
            started = time.perf_counter()
            texts = run()
            seconds = time.perf_counter() - started
        outputs[name] = texts
        results[name] = {"seconds": seconds, "startup": startup, "peak_gib": memory.gib}
        print(f"  {name}: {len(prompts) / seconds:.2f} problems/s ({seconds:.1f} s), start-up {startup:.1f} s, "
              f"peak {memory.gib:.2f} GiB", flush=True)

    hf_model, tokenizer, hf_startup = load("hf", True)
    lengths = sorted(map(len, encode_ids(tokenizer, prompts, 10**9)))
    print(f"{len(prompts)} {task.name}/{args.split} prompts, {n_demos} demos: prompt tokens {lengths[0]}-{lengths[-1]} "
          f"(median {lengths[len(lengths) // 2]}), max_new_tokens {max_new}, model {args.load}, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    room = engine_class("hf").prompt_limit(hf_model, greedy)
    if lengths[-1] > room:  # the seed-style loop does not cut prompts, and a cut would make the variants differ
        sys.exit(f"error: --demos {n_demos}: prompts of up to {lengths[-1]} tokens do not fit the model's {room} "
                 f"(its positions less max_new_tokens); use fewer demos")
    generate(hf_model, tokenizer, prompts[:4], dataclasses.replace(greedy, batch_size=4), progress=False)  # warm-up
    for name, prefix_cache in (("hf without prefix cache", False), ("hf + prefix cache", True)):
        if args.skip_hf_plain and not prefix_cache:
            continue
        cfg = dataclasses.replace(greedy, prefix_cache=prefix_cache)
        timed(name, lambda cfg=cfg, model=hf_model: [o[0] for o in generate(model, tokenizer, prompts, cfg, progress=False)],
              hf_startup)
    if not args.skip_seed:
        timed("seed-style loop", lambda model=hf_model: seed_style(model, tokenizer, prompts, max_new), hf_startup)

    exam = dataclasses.replace(greedy, do_sample=True, num_samples=args.exam_samples, seed=0)
    exam_prompts = prompts[:args.exam_limit]
    exam_seconds = {}
    if args.exam_limit:
        started = time.perf_counter()
        generate(hf_model, tokenizer, exam_prompts, exam, progress=False)
        exam_seconds["hf"] = time.perf_counter() - started
    del hf_model
    gc.collect()

    for name, prefix_cache in (("vllm + prefix caching", True), ("vllm without prefix caching", False)):
        with PeakMemory() as memory:
            llm, _, startup = load("vllm", prefix_cache)
        cfg = dataclasses.replace(greedy, engine="vllm", prefix_cache=prefix_cache)
        generate(llm, tokenizer, prompts[:4], cfg, progress=False)  # warm-up, as for HF
        timed(name, lambda cfg=cfg, llm=llm: [o[0] for o in generate(llm, tokenizer, prompts, cfg, progress=False)], startup)
        results[name]["peak_gib"] = max(results[name]["peak_gib"], memory.gib)
        if prefix_cache and args.exam_limit:
            started = time.perf_counter()
            generate(llm, tokenizer, exam_prompts, dataclasses.replace(exam, engine="vllm"), progress=False)
            exam_seconds["vllm"] = time.perf_counter() - started
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    reference = outputs["hf + prefix cache" if args.skip_hf_plain else "hf without prefix cache"]
    print(f"\n{'variant':32s} {'problems/s':>10s} {'vs seed':>8s} {'vs hf':>7s} {'start-up s':>10s} {'peak GiB':>8s} "
          f"{'same as hf':>10s}")
    for name, row in results.items():
        rate = len(prompts) / row["seconds"]
        vs_seed = (f"{results['seed-style loop']['seconds'] / row['seconds']:7.2f}x" if "seed-style loop" in results
                   else f"{'-':>8s}")
        vs_hf = results["hf + prefix cache"]["seconds"] / row["seconds"]
        same = sum(a == b for a, b in zip(outputs[name], reference))
        print(f"{name:32s} {rate:10.2f} {vs_seed} {vs_hf:6.2f}x {row['startup']:10.1f} {row['peak_gib']:8.2f} "
              f"{same:>6d}/{len(prompts)}")
    if exam_seconds:
        n = len(exam_prompts)
        print(f"\nexam, {n} questions x {args.exam_samples} samples: " + ", ".join(
            f"{engine} {n / s:.2f} questions/s ({s:.1f} s)" for engine, s in exam_seconds.items())
            + (f"; vllm/hf speed {exam_seconds['hf'] / exam_seconds['vllm']:.2f}x" if len(exam_seconds) == 2 else ""))


if __name__ == "__main__":
    main()
