"""The evidence run's numbers: mean +- std per arm, the paired differences named in PAIRS (a bootstrap interval
over seeds and questions, a t interval over per-seed means, p-values, Holm's correction over the pairs shown and a
verdict), what the teacher cost each arm, the stage commands and versions behind them, the table and the plot.
Reads only the finished stages' files (evidence.run passes their manifests)."""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from arms import EVIDENCE_ARMS
from common import UserError, read_json
from driver_args import EvidenceArguments
from paired_stats import CLAIM_ALPHA, claims, pair_statistics, unbound
from stage_process import command_of

# (a, b, what a - b tests), in the order the method builds up: round 1, round 2, the whole, then the loss variant.
# A pair whose arms are not in the run is skipped; Holm's family is the pairs reported.
PAIRS = [
    ("std-cot", "student", "distillation"),
    ("+reflect", "std-cot", "self-reflection, tuned margin"),
    ("+reflect-m1", "std-cot", "self-reflection, margin 1.0"),
    ("tailored", "+reflect", "a second round"),
    ("tailored", "untailored", "tailoring vs random questions"),
    ("tailored", "more-epochs", "round 2 beyond its compute"),
    ("tailored", "tailored-no-reflect", "self-reflection in round 2"),
    ("tailored-m1", "tailored-no-reflect", "the same at margin 1.0"),
    ("tailored", "student", "the whole method"),
    ("+prefer", "+reflect", "preference loss vs triplet"),
]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def per_question(eval_entry: dict) -> tuple[list[str], list[int]]:
    results = read_json(eval_entry["file"])["results"]
    return [r["question"] for r in results], [int(bool(r["correct"])) for r in results]


def lineage(arm: str) -> list[str]:
    chain = []
    while arm and arm != "student":
        chain.append(arm)
        arm = EVIDENCE_ARMS[arm].parent
    return chain[::-1]


def teacher_use(manifests: dict[str, dict[int, dict]], arm: str, seed: int) -> dict:
    """Teacher requests, tokens and cost behind an arm's training data: every teacher stage on its
    lineage, each counted once (more-epochs re-uses round 1's)."""
    stages = {}
    for step in lineage(arm):
        collected = manifests[step][seed].get("teacher") or {}
        if collected:
            stages[collected["teacher_data"]] = collected
    tokens = [s.get("tokens") or {} for s in stages.values()]
    return {"requests": sum(s.get("requests", 0) for s in stages.values()),
            "prompt_tokens": sum(t.get("prompt_tokens", 0) for t in tokens),
            "completion_tokens": sum(t.get("completion_tokens", 0) for t in tokens),
            "cost_usd": round(sum(s.get("cost_usd", 0.0) for s in stages.values()), 6),
            "kept": sum(s.get("kept", 0) for s in stages.values())}


def list_price_cost(args: EvidenceArguments, prompt_tokens: int, completion_tokens: int) -> float | None:
    """What the tokens would cost at --teacher_model's list price (the offline teacher is free; its token
    counts are estimates, 4 characters a token); None for an unknown model."""
    from teacher_journal import load_price_table, resolve_prices

    prices = resolve_prices(args.teacher_model, load_price_table(None), None, None)
    return round(prices.cost(prompt_tokens, completion_tokens), 6) if prices.known else None


def summarize(args: EvidenceArguments, arms: list[str], seeds: list[int], manifests: dict[str, dict[int, dict]],
              drivers: dict) -> dict:
    """`drivers`: evidence.ArmDriver per seed (where each arm's folders are)."""
    splits = args.eval_splits.split(",")
    per_arm, outcomes = {}, {}
    for arm in arms:
        runs = {}
        for seed in seeds:
            m = manifests[arm][seed]
            use = teacher_use(manifests, arm, seed)
            run = {split: {"acc": m["eval"][split]["acc"], "strict_acc": m["eval"][split]["strict_acc"],
                           "total": m["eval"][split]["total"], "file": m["eval"][split]["file"]} for split in splits}
            run.update(teacher=use, seconds=m.get("seconds", 0))
            if arm != "student":
                train = drivers[seed].round_dir(arm, EVIDENCE_ARMS[arm].round) / "train" / "train_summary.json"
                run["train_steps"] = read_json(train)["steps"]
                run["exam"] = m.get("exam")
            runs[str(seed)] = run
            for split in splits:
                outcomes[(arm, seed, split)] = per_question(m["eval"][split])
        spec = EVIDENCE_ARMS[arm]
        per_arm[arm] = {"round": spec.round, "parent": spec.parent, "describe": spec.describe, "per_seed": runs}
    rows = []
    for arm in arms:
        runs = per_arm[arm]["per_seed"]
        row = {"arm": arm, "round": EVIDENCE_ARMS[arm].round, "seeds": len(runs)}
        for split in splits:
            row[split] = dict(zip(("mean", "std"), mean_std([r[split]["acc"] for r in runs.values()])))
            row[split]["strict_mean"] = mean_std([r[split]["strict_acc"] for r in runs.values()])[0]
        for key in ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "kept"):
            row[key] = mean_std([r["teacher"][key] for r in runs.values()])[0]
        row["list_price_usd"] = list_price_cost(args, row["prompt_tokens"], row["completion_tokens"])
        row["minutes"] = mean_std([r["seconds"] for r in runs.values()])[0] / 60
        rows.append(row)
    split = "test" if "test" in splits else splits[-1]
    reported, statistics = [], []
    for a, b, label in PAIRS:
        if a not in arms or b not in arms:
            continue
        qa = [outcomes[(a, s, split)] for s in seeds]
        qb = [outcomes[(b, s, split)] for s in seeds]
        if any(x[0] != y[0] for x, y in zip(qa, qb)):
            raise UserError(f"{a} and {b} were evaluated on different {split} questions (another --eval_limit?)")
        reported.append({"a": a, "b": b, "label": label, "split": split, "seeds": len(seeds), "questions": len(qa[0][0])})
        statistics.append(pair_statistics(np.array([x[1] for x in qa]), np.array([y[1] for y in qb]), args.bootstrap))
    pairs = [{**pair, **numbers} for pair, numbers in zip(reported, claims(statistics))]
    return {"settings": asdict(args), "seeds": seeds, "splits": splits, "arms": per_arm, "rows": rows,
            "pairs": pairs, "commands": stage_commands(Path(args.workdir)), "versions": versions()}


def stage_commands(root: Path) -> list[dict]:
    """Every stage's command, from the first line of its log (so a resumed run lists them all)."""
    found = []
    for log in sorted(root.rglob("log.txt")):
        command = command_of(log)
        if command:
            found.append({"stage": str(log.parent.relative_to(root)), "command": command})
    return found


def versions() -> dict:
    import torch
    import transformers

    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(["git", *argv], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(status) if status is not None else None, "command": shlex.join([sys.executable, *sys.argv])}


# ---------------------------------------------------------------- output

def print_table(result: dict) -> None:
    splits = result["splits"]
    print(f"\n{len(result['seeds'])} seed(s) {', '.join(map(str, result['seeds']))}: accuracy mean +- std over seeds")
    head = f"{'arm':<20} {'round':>5}" + "".join(f"  {s[:10] + ' acc':>19}" for s in splits) + \
        f"  {'requests':>8}  {'tokens':>9}  {'cost($)':>8}  {'list $':>7}  {'minutes':>7}"
    print(head)
    for row in result["rows"]:
        line = f"{row['arm']:<20} {row['round']:>5}"
        line += "".join(f"  {row[s]['mean']:.4f} +- {row[s]['std']:.4f}" for s in splits)
        price = "-" if row["list_price_usd"] is None else f"{row['list_price_usd']:.4f}"
        line += (f"  {row['requests']:>8.0f}  {row['prompt_tokens'] + row['completion_tokens']:>9.0f}"
                 f"  {row['cost_usd']:>8.4f}  {price:>7}  {row['minutes']:>7.1f}")
        print(line)
    teacher = result["settings"]["teacher_model"]
    print(f"requests, tokens, cost: the teacher stages behind the arm's training data (mean over seeds); list $: those "
          f"tokens at {teacher}'s list price; minutes: the arm's own round")
    if result["pairs"]:
        print_pairs(result["pairs"])
    print("arms: " + "; ".join(f"{arm}: {EVIDENCE_ARMS[arm].describe}" for arm in result["arms"]))


def _interval(low: float | None, high: float | None) -> str:
    return f"[{unbound(low, -1):+.4f}, {unbound(high, 1):+.4f}]"


def print_pairs(pairs: list[dict]) -> None:
    """Two lines a pair: what it tests, then its numbers under one header."""
    first = pairs[0]
    n_seeds = first["seeds"]
    print(f"\npaired differences a - b on {first['split']} (same seed, same question; {n_seeds} seed(s) x "
          f"{first['questions']} questions), {len(pairs)} pairs:")
    print(f"  diff [95% bootstrap over seeds and questions]; 95% seed t over the {n_seeds} per-seed means "
          f"({n_seeds - 1} df); Holm p over the {len(pairs)} pairs shown,")
    print("  from the larger of the bootstrap and t p-values; claim: both intervals at the pair's Holm level, "
          "the wider (their hull) for claims;")
    print(f"  supported (+/-): Holm p < {CLAIM_ALPHA} and the claim interval excludes 0, with the sign of a - b")
    if n_seeds < 2:
        print("  one seed: the seed t interval is unbounded, so no difference is claimed (intended: one training run "
              "cannot tell a method from its seed)")
    print(f"      {'diff [95% bootstrap]':<26} {'95% seed t':<19} {'Holm p':>7}  {'claim interval (level)':<29} verdict")
    for p in pairs:
        print(f"  {p['a']} - {p['b']}: {p['label']}")
        claim = f"{_interval(p['claim_low'], p['claim_high'])} ({100 * p['adjusted_level']:.2f}%)"
        print(f"      {p['diff']:+.4f} {_interval(p['low'], p['high'])} {_interval(p['seed_low'], p['seed_high']):<19}"
              f" {p['holm_p']:>7.4f}  {claim:<29} {p['verdict']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = result["splits"]
    rows = {row["arm"]: row for row in result["rows"]}
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.0), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for k, (arm, row) in enumerate(rows.items()):
            x = row["round"] + (k - len(rows) / 2) * 0.03  # a small shift keeps the error bars apart
            ax.errorbar([x], [row[split]["mean"]], yerr=[row[split]["std"]], fmt="o", color=f"C{k % 10}", capsize=3,
                        label=arm)
            parent = EVIDENCE_ARMS[arm].parent
            if parent in rows:
                px = rows[parent]["round"] + (list(rows).index(parent) - len(rows) / 2) * 0.03
                ax.plot([px, x], [rows[parent][split]["mean"], row[split]["mean"]], color=f"C{k % 10}", alpha=0.6)
        ax.set_title(f"{split} (mean +- std over {len(result['seeds'])} seed(s))")
        ax.set_xlabel("round")
        ax.set_xticks([0, 1, 2])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (flexible)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 3) // 4), 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
