"""Where a run's CPU time goes, from a py-spy profile of it and all its stage processes.

    py-spy record --subprocesses --format raw --rate 50 -o demo.txt -- bash scripts/demo.sh
    python bench/breakdown.py demo.txt --seconds <wall time of the run>

py-spy samples each process's running threads (`--rate` per second); a sample's stack is put in the first
matching bucket: process start and imports (any frame inside an import), the teacher, generation, training,
model and data loading, writing, then anything else. Samples are split by stage script as well (the
process's command line). CPU seconds = samples / rate; with several processes at once they overlap."""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

# (bucket, pattern on the "function (file:line)" frames), tried in order on the whole stack
BUCKETS = [
    # threads parked on a lock or queue (TensorBoard's writer, tqdm's monitor): sampled, but not CPU work
    ("waiting threads", re.compile(r"Condition\.wait|Event\.wait|Queue\.get|_AsyncWriterThread|TMonitor")),
    ("imports", re.compile(r"_find_and_load|<frozen importlib|_call_with_frames_removed")),
    ("teacher", re.compile(r"\((?:teacher\w*|query_teacher)\.py:")),
    ("generation", re.compile(r"\(generation\.py:|generate \(|_sample \(")),
    ("training", re.compile(r"training_step|compute_tailored_loss|_inner_training_loop|warm_start|backward \(|optimizer|"
                           r"step \(.*optim")),
    ("model and data loading", re.compile(r"from_pretrained|load_state_dict|safe_open|safetensors|\(tasks\.py:|"
                                          r"\(train_data\.py:|\(wordmath\.py:|datasets/|tokenization|train_tokenizer")),
    ("writing", re.compile(r"save_pretrained|save_model|_save_checkpoint|atomic_write|json/encoder|tensorboard|"
                           r"matplotlib|savefig|SummaryWriter")),
]
STAGES = ["run_trainer.py", "infer_student_wrong.py", "infer.py", "query_teacher.py", "build_student.py", "prepare_data.py",
          "run_rounds.py", "reproduce.py"]


def bucket_of(stack: str) -> str:
    return next((name for name, pattern in BUCKETS if pattern.search(stack)), "other")


def stage_of(stack: str) -> str:
    """The innermost process's script (py-spy roots a child's stacks at its parents' "process PID:cmd" frames)."""
    processes = [frame for frame in stack.split(";") if frame.startswith("process ")]
    return next((s for s in STAGES if processes and s in processes[-1]), "other process")


def read(path: str) -> tuple[Counter, dict[str, Counter]]:
    by_bucket, by_stage = Counter(), defaultdict(Counter)
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        bucket = bucket_of(stack)
        by_bucket[bucket] += int(count)
        by_stage[stage_of(stack)][bucket] += int(count)
    return by_bucket, by_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="py-spy --format raw output")
    p.add_argument("--rate", type=float, default=50, help="py-spy --rate of the profile")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the profiled run, for the header")
    args = p.parse_args()
    by_bucket, by_stage = read(args.profile)
    total = sum(by_bucket.values())
    head = f"{total / args.rate:.0f} CPU s sampled" + (f" over {args.seconds:.0f} s wall" if args.seconds else "")
    names = [name for name, _ in BUCKETS] + ["other"]
    print(head)
    print("| stage | " + " | ".join(names) + " | all |")
    print("|---" * (len(names) + 2) + "|")
    rows = sorted(by_stage.items(), key=lambda kv: -sum(kv[1].values())) + [("all", by_bucket)]
    for stage, counts in rows:
        cells = [f"{counts[n] / args.rate:.0f}" for n in names]
        print(f"| {stage} | " + " | ".join(cells) + f" | {sum(counts.values()) / args.rate:.0f} "
              f"({100 * sum(counts.values()) / max(total, 1):.0f}%) |")


if __name__ == "__main__":
    main()
