"""Wall time of the embedded demo, whole and per stage, on this machine.

    python bench/bench_demo.py                      # run_rounds.py's defaults into a fresh workdir
    python bench/bench_demo.py --fresh_student      # ... and build the round-0 student too (a new clone's first run)
    python bench/bench_demo.py -- --jobs 1          # flags after -- go to run_rounds.py
    LTR_FRESH_STAGES=1 python bench/bench_demo.py   # every stage in a fresh interpreter (the old way)

The data (localdataset/) is kept: it takes seconds. `--fresh_student` builds the student first, into the
workdir rather than checkpoints/ (the user's copy is untouched), as run_rounds.py would on a new clone. Per-stage seconds come from the last line the driver writes
into each stage's log (stage_process.DONE_MARK); with --jobs 2 stages overlap, so they add up to more than
the wall time."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stage_process import DONE_MARK  # noqa: E402


def stage_times(workdir: Path) -> list[tuple[str, str, float]]:
    """(stage script, log folder, seconds) for every stage log under workdir."""
    rows = []
    for log in sorted(workdir.rglob("*.txt")) + sorted(workdir.rglob("*.log")):
        text = log.read_text(errors="replace")
        done = re.findall(rf"\[{DONE_MARK} ([0-9.]+)s, exit (-?\d+)\]", text)
        if not text.startswith("$ ") or not done:
            continue
        script = next((w for w in text.split("\n", 1)[0].split() if w.endswith(".py")), "?")
        rows.append((script, str(log.parent.relative_to(workdir)), float(done[-1][0])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh_student", action="store_true", help="Build the round-0 student as part of the run.")
    parser.add_argument("--workdir", default=None, help="Default: a new temporary folder.")
    parser.add_argument("rest", nargs="*", help="Flags for run_rounds.py (after --).")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_demo_"))
    argv = [sys.executable, "run_rounds.py", "--workdir", str(workdir)]
    started = time.time()
    if args.fresh_student:  # what run_rounds.py runs first on a new clone, into the workdir instead of checkpoints/
        from driver_args import RoundsArguments

        defaults = RoundsArguments()
        build = [sys.executable, "build_student.py", "--out", str(workdir / "student"), "--warm_steps", str(defaults.warm_steps)]
        print("$ " + " ".join(build), flush=True)
        subprocess.run(build, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"student built in {time.time() - started:.1f} s", flush=True)
        argv += ["--student", str(workdir / "student"), "--lr", str(defaults.learning_rate)]
    argv += args.rest
    run = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    (workdir / "driver_output.txt").write_text(run.stdout)
    if run.returncode:
        print(run.stdout[-3000:])
        sys.exit(f"run_rounds.py exited {run.returncode}")
    table = run.stdout[run.stdout.rfind("round  arm"):]
    print(table.split("\nplot:")[0])
    rows = stage_times(workdir)
    by_script: dict[str, list[float]] = defaultdict(list)
    for script, _, seconds in rows:
        by_script[script].append(seconds)
    print(f"\n{'stage':<26}{'runs':>6}{'seconds':>10}")
    for script, seconds in sorted(by_script.items(), key=lambda kv: -sum(kv[1])):
        print(f"{script:<26}{len(seconds):>6}{sum(seconds):>10.1f}")
    print(f"{'all stages':<26}{len(rows):>6}{sum(s for *_, s in rows):>10.1f}")
    print(f"\nwall time {wall:.1f} s ({wall / 60:.1f} min), {os.cpu_count()} cores, "
          f"LTR_FRESH_STAGES={os.environ.get('LTR_FRESH_STAGES', '')!r}, flags: {' '.join(args.rest) or '(defaults)'}")
    print(f"workdir: {workdir}")


if __name__ == "__main__":
    main()
