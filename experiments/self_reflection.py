"""Controlled runs of the self-reflection (triplet) loss: one round of training from the same student
on the same data and steps, varying only the loss settings, over several seeds; accuracy on
validation (what every choice reads) and test (reported, never tuned on).

    python experiments/self_reflection.py --student checkpoints/wordmath-student \
        --teacher_data runs/demo/round1/teacher/teacher_data.json \
        --negatives runs/demo/round1/exam/student_wrong.json --seeds 1,2,3,4 --jobs 2

Each run is `run_trainer.py` then `infer.py` on every split, as a user would type them (printed);
a finished run is skipped, so a killed sweep re-run continues. The table gives, per arm, the
mean +- std over seeds, and the paired difference to the reference arm (--reference, LM loss
only by default) with a 95% bootstrap interval over questions and seeds. results.json keeps
every per-seed number and the commands.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import atomic_write_json, read_json  # noqa: E402

# Every arm trains with the same flags except these. The first six separate the hypotheses of the
# issue: negative form (own answer line vs the original's gold line), anchor gradient (from the LM
# forward vs re-read on the no-grad prompt as the original), loss scale and margin, representation.
ARMS: dict[str, list[str]] = {
    "lm": ["--contrastive", "no"],
    "own-full": ["--cl_neg_form", "own", "--cl_anchor", "full"],  # what the demo ran before
    "gold-full": ["--cl_neg_form", "gold", "--cl_anchor", "full"],
    "own-detached": ["--cl_neg_form", "own", "--cl_anchor", "detached"],
    "gold-detached": ["--cl_neg_form", "gold", "--cl_anchor", "detached"],  # the original's anchor
    "own-full-r0.1": ["--cl_neg_form", "own", "--cl_anchor", "full", "--cl_ratio", "0.1"],
    "own-full-p0.2": ["--cl_neg_form", "own", "--cl_anchor", "full", "--cl_p", "0.2"],
    "own-full-pool": ["--cl_neg_form", "own", "--cl_anchor", "full", "--cl_repr", "pool"],
    "gold-detached-r0.1": ["--cl_neg_form", "gold", "--cl_anchor", "detached", "--cl_ratio", "0.1"],
    "gold-detached-pool": ["--cl_neg_form", "gold", "--cl_anchor", "detached", "--cl_repr", "pool"],
    # smaller margins: a cosine triplet with margin 1 is almost never satisfied, so it never stops pulling
    "gold-detached-p0.5": ["--cl_neg_form", "gold", "--cl_anchor", "detached", "--cl_p", "0.5"],
    "gold-detached-p0.2": ["--cl_neg_form", "gold", "--cl_anchor", "detached", "--cl_p", "0.2"],
    "gold-detached-p0.1": ["--cl_neg_form", "gold", "--cl_anchor", "detached", "--cl_p", "0.1"],
    "own-detached-p0.2": ["--cl_neg_form", "own", "--cl_anchor", "detached", "--cl_p", "0.2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="checkpoints/wordmath-student", help="Round-0 student every arm starts from.")
    p.add_argument("--teacher_data", required=True, help="Round-1 teacher rationales (also the positives).")
    p.add_argument("--negatives", required=True, help="The student's wrong rationales (student_wrong.json).")
    p.add_argument("--task", default="wordmath")
    p.add_argument("--data_dir", default="localdataset")
    p.add_argument("--workdir", default="runs/self_reflection")
    p.add_argument("--arms", default=",".join(ARMS), help=f"Comma list of: {', '.join(ARMS)}.")
    p.add_argument("--reference", default="lm", help="Arm every other one is compared with.")
    p.add_argument("--seeds", default="1,2,3", help="Training seeds (data order, positive/negative draws).")
    p.add_argument("--lrs", default="5e-4", help="Comma list of learning rates: every arm runs at each.")
    p.add_argument("--splits", default="validation,test", help="Splits every run is evaluated on.")
    p.add_argument("--jobs", type=int, default=1, help="Runs at once.")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores / jobs).")
    p.add_argument("--device", default="cpu", help="cpu, or a GPU id every run shares (e.g. 0).")
    p.add_argument("--train_flags", default="--epoch 1 --train_bsz 16 --warmup_steps 20 --weight_decay 0.01 "
                                            "--lr_scheduler_type constant_with_warmup --max_grad_norm 1.0",
                   help="Flags shared by every arm (the demo's round settings, those of the recorded runs).")
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--eval_limit", type=int, default=0, help="Evaluate only the first N items of each split (0: all).")
    p.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples for the intervals.")
    p.add_argument("--summarize_only", action="store_true",
                   help="Run nothing: summarize the runs already finished in --workdir (pairs on the seeds both arms have).")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    if args.reference not in args.arms.split(","):
        p.error(f"--reference {args.reference!r} is not among --arms")
    for flag in ("student", "teacher_data", "negatives"):
        if not Path(getattr(args, flag)).exists():
            p.error(f"--{flag}: {getattr(args, flag)} not found")
    return args


_PRINT = threading.Lock()  # runs start from several threads: one whole line each


def run_logged(argv: list[str], log: Path, env: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with _PRINT:
        sys.stdout.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        sys.stdout.flush()
    with open(log, "w") as sink:
        if subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode != 0:
            raise SystemExit(f"error: run failed, see {log}")


def finished(args, arm: str, lr: str, seed: int) -> bool:
    folder = Path(args.workdir) / f"lr{lr}" / arm / f"seed{seed}"
    return (folder / "train" / "train_summary.json").is_file() and all(
        any((folder / f"eval_{split}").glob("Acc*.json")) for split in args.splits.split(","))


def one_run(args, arm: str, lr: str, seed: int, env: dict) -> dict:
    folder = Path(args.workdir) / f"lr{lr}" / arm / f"seed{seed}"
    train_dir, final = folder / "train", folder / "train" / "final"
    device = ["--device", args.device]
    started = time.time()
    if not (train_dir / "train_summary.json").is_file():  # written last, after final/
        argv = [sys.executable, "run_trainer.py", "--task", args.task, "--data_dir", args.data_dir, *device,
                "--checkpoint", args.student, "--teacher_data", args.teacher_data, "--contrastive", "yes",
                "--cl_pos_path", args.teacher_data, "--cl_neg_path", args.negatives, "--seed", str(seed),
                "--lr", lr, *shlex.split(args.train_flags), "--logging_steps", "20", "--output_dir", str(train_dir),
                *ARMS[arm]]
        run_logged(argv, folder / "train.log", env)
    result = {"arm": arm, "lr": lr, "seed": seed, "train": read_json(train_dir / "train_summary.json")}
    for split in args.splits.split(","):
        out = folder / f"eval_{split}"
        found = sorted(out.glob("Acc*.json"))
        if not found:
            # the settings these runs were measured with: float32, any first token (infer.py now
            # defaults to the original's float16 on a GPU and suppression of special first tokens)
            argv = [sys.executable, "infer.py", "--task", args.task, "--data_dir", args.data_dir, *device,
                    "--fp16", "no", "--decode_eos_token", "no", "--rationale", "--test_on", split,
                    "--checkpoint", str(final), "--batch", str(args.eval_batch), "--output_dir", str(out)] + (["--limit", str(args.eval_limit)] if args.eval_limit else [])
            run_logged(argv, folder / f"eval_{split}.log", env)
            found = sorted(out.glob("Acc*.json"))
        scored = read_json(found[-1])
        items = scored["results"]
        texts = [r["raw_generated"] for r in items]
        rate, steps = wrong_step_rate(texts)
        result[split] = {"acc": scored["accuracy"], "strict_acc": scored["strict_accuracy"],
                         "answer_line": sum("\nAnswer" in t for t in texts) / len(items),
                         "wrong_steps": rate, "steps": steps, "correct": [int(r["correct"]) for r in items]}
    result["seconds"] = round(time.time() - started, 1)
    return result


_EQUATION = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\b")


def wrong_step_rate(texts: list[str]) -> tuple[float, int]:
    """Share of written-out integer steps 'a + b = c' (also - and *) whose result is wrong, and their number:
    tells a student that reasons in the right shape but computes wrong from one that lost the format."""
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    steps = [(apply[op](int(a), int(b)), int(c)) for text in texts for a, op, b, c in _EQUATION.findall(text)]
    return (sum(want != got for want, got in steps) / len(steps) if steps else 0.0), len(steps)


def paired_interval(arm: np.ndarray, ref: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of (arm - ref) over seeds x questions and a 95% interval, resampling seeds and questions."""
    diff = arm - ref  # (seeds, questions), seeds paired with seeds, questions with questions
    n_seeds, n_questions = diff.shape
    means = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        questions = rng.integers(0, n_questions, n_questions)
        means[b] = diff[np.ix_(seeds, questions)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def summarize(args, runs: list[dict]) -> dict:
    rng = np.random.default_rng(0)
    splits = args.splits.split(",")
    table = []
    for lr in args.lrs.split(","):
        ref_runs = {r["seed"]: r for r in runs if r["arm"] == args.reference and r["lr"] == lr}
        for arm in args.arms.split(","):
            mine = sorted((r for r in runs if r["arm"] == arm and r["lr"] == lr), key=lambda r: r["seed"])
            if not mine:
                continue
            paired = [r for r in mine if r["seed"] in ref_runs]
            row = {"arm": arm, "lr": lr, "seeds": [r["seed"] for r in mine]}
            for split in splits:
                accs = np.array([r[split]["acc"] for r in mine])
                row[split] = {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                              "per_seed": accs.tolist(),
                              "wrong_steps": float(np.mean([r[split]["wrong_steps"] for r in mine])),
                              "answer_line": float(np.mean([r[split]["answer_line"] for r in mine]))}
                if arm != args.reference and paired:
                    correct = np.array([r[split]["correct"] for r in paired])
                    ref = np.array([ref_runs[r["seed"]][split]["correct"] for r in paired])
                    mean, low, high = paired_interval(correct, ref, args.bootstrap, rng)
                    row[split]["diff_vs_reference"] = {"mean": mean, "low": low, "high": high,
                                                       "seeds": [r["seed"] for r in paired]}
            table.append(row)
    return {"reference": args.reference, "rows": table}


def print_table(args, summary: dict) -> None:
    splits = args.splits.split(",")
    head = (f"{'lr':>7}  {'arm':<20} {'seeds':>5}"
            + "".join(f"  {s + ' acc':>17}  {'vs ' + args.reference + ' [95% CI]':>26}" for s in splits)
            + f"  {'wrong steps':>11}")
    print("\n" + head)
    for row in summary["rows"]:
        line = f"{row['lr']:>7}  {row['arm']:<20} {len(row['seeds']):>5}"
        for split in splits:
            cell = row[split]
            line += f"  {cell['mean']:>8.4f} +- {cell['std']:.4f}"
            d = cell.get("diff_vs_reference")
            line += f"  {d['mean']:>+8.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else f"  {'-':>26}"
        print(line + f"  {row[splits[0]]['wrong_steps']:>11.3f}")
    print(f"wrong steps: share of the written 'a + b = c' steps with a wrong result ({splits[0]}, mean over seeds)")


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    plan = [(arm, lr, int(seed)) for seed in args.seeds.split(",") for lr in args.lrs.split(",")
            for arm in args.arms.split(",")]
    started = time.time()
    if args.summarize_only:
        plan = [job for job in plan if finished(args, *job)]
        if not plan:
            raise SystemExit(f"error: --summarize_only: no finished run in {args.workdir}")
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: one_run(args, *job, env), plan))
    summary = summarize(args, runs)
    atomic_write_json(Path(args.workdir) / "results.json",
                      {"command": " ".join(shlex.quote(a) for a in sys.argv), "arms": {a: ARMS[a] for a in args.arms.split(",")},
                       "train_flags": args.train_flags, "summary": summary, "runs": runs,
                       "minutes": round((time.time() - started) / 60, 1)})
    print_table(args, summary)
    print(f"\n{len(runs)} runs, {(time.time() - started) / 60:.1f} min; every number in {Path(args.workdir) / 'results.json'}")


if __name__ == "__main__":
    main()
