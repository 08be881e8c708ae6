"""How fast each script answers when it has nothing to compute: `--help`, a malformed flag, a flag with a bad
value, and the teacher's `--dry_run`. Target (issue 20): each within 3 s on the 2-core machine. Baseline in
the same run: `python -c pass` (the interpreter alone) and `python -c "import torch, transformers"` (what a
script pays when it imports the stack before looking at its flags).

    python bench/bench_startup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("python -c pass", ["-c", "pass"], None),
    ("import torch, transformers", ["-c", "import torch, transformers"], None),
    ("run_trainer.py --help", ["run_trainer.py", "--help"], 0),
    ("run_trainer.py --lr abc", ["run_trainer.py", "--lr", "abc"], 2),
    ("run_trainer.py --epoch -1", ["run_trainer.py", "--epoch", "-1"], 2),
    ("run_trainer.py --task nope", ["run_trainer.py", "--task", "nope"], 2),
    ("infer.py --help", ["infer.py", "--help"], 0),
    ("infer.py --batch 0", ["infer.py", "--batch", "0"], 2),
    ("infer_student_wrong.py --help", ["infer_student_wrong.py", "--help"], 0),
    ("query_teacher.py --help", ["query_teacher.py", "--help"], 0),
    ("query_teacher.py --num_samples 0", ["query_teacher.py", "--num_samples", "0"], 2),
    ("query_teacher.py --dry_run", ["query_teacher.py", "--dry_run", "yes", "--output_dir", "{tmp}/teacher"], 0),
    ("run_rounds.py --help", ["run_rounds.py", "--help"], 0),
    ("run_rounds.py --rounds 0", ["run_rounds.py", "--rounds", "0"], 2),
    ("reproduce.py --help", ["reproduce.py", "--help"], 0),
]


def timed(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start, done.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"| command | median s (of {args.repeats}) | exit | within 3 s |")
        print("|---|---|---|---|")
        for name, argv, expected in CASES:
            argv = [a.replace("{tmp}", tmp) for a in argv]
            runs = [timed(argv) for _ in range(args.repeats)]
            seconds = statistics.median(t for t, _ in runs)
            code = runs[0][1]
            flag = "" if expected is None else ("yes" if seconds <= 3 else "NO")
            note = "" if expected is None or code == expected else f" (expected {expected})"
            print(f"| `{name}` | {seconds:.2f} | {code}{note} | {flag} |", flush=True)


if __name__ == "__main__":
    main()
