"""Choose the learning rate and the triplet margin on validation, for the student a run will use.

    python tune.py                                   # the embedded default: wordmath, offline teacher, CPU
    python tune.py --task gsm_symbolic --student checkpoints/smollm2-135m-instruct --lrs 5e-5,1e-4,2e-4 --margins 0.1,0.3,1.0
Two steps, each round 1 from the round-0 student on the round-1 data reproduce.py uses (the same exam and
teacher stages, shared by every setting):
  1. std-cot (LM loss only) at each --lrs value: the rate with the best mean validation accuracy;
  2. +reflect (LM + triplet) at that rate with each --margins value: the margin likewise.
Only validation is evaluated; test is never read. The answer is the flags to pass to reproduce.py
(`--lr X --cl_p Y`), printed and written to <workdir>/tuning.json with every number behind it. A killed run
re-run with the same flags skips every finished stage.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import evidence
from common import UserError, atomic_write_json, cli_main
from driver_args import EvidenceArguments
from flags import parse
from reproduce import apply_quick
from run_rounds import check_learning_rate, prepare_embedded
from stage_process import driver_exits, run_jobs, say


@dataclass
class TuneArguments(EvidenceArguments):
    workdir: str = field(default="runs/tune", metadata={"help": "seed<s>/ per seed (the shared exam and teacher, one folder "
                                                                "per setting), tuning.json."})
    lrs: str = field(default="1e-4,2e-4,5e-4,1e-3", metadata={"help": "Learning rates tried with std-cot (comma list)."})
    margins: str = field(default="0.03,0.1,0.3,1.0", metadata={"help": "Triplet margins (--cl_p) tried with +reflect at the "
                                                                       "chosen rate (comma list; 1.0 is the paper's)."})
    seeds: int = field(default=2, metadata={"help": "Seeds per setting (--seed, --seed + 1, ...)."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("lrs", "margins"):
            try:
                values = [float(v) for v in getattr(self, name).split(",")]
            except ValueError:
                raise UserError(f"--{name}: expected a comma list of numbers, got {getattr(self, name)!r}") from None
            if not values or any(v < 0 for v in values) or (name == "lrs" and any(v <= 0 for v in values)):
                raise UserError(f"--{name}: expected positive numbers, got {getattr(self, name)!r}")


class SettingDriver(evidence.ArmDriver):
    """One seed's round-1 arm at one setting: its own training and evaluation folders, the seed's shared exam
    and teacher stages."""

    def __init__(self, args: EvidenceArguments, seed: int, name: str, overrides: dict):
        super().__init__(args, seed)
        self.name, self.overrides = name, overrides

    def round_dir(self, arm: str, r: int) -> Path:
        return self.workdir / f"{evidence.slug(arm)}-{self.name}" / f"round{r}"

    def train_settings(self, arm: str, r: int, planning: bool = False) -> dict:
        return {**super().train_settings(arm, r, planning), **self.overrides}


def sweep(args: TuneArguments, arm: str, grid: dict[str, dict]) -> dict[str, dict]:
    """Each setting of `grid` (name -> training flags) over the seeds: validation accuracy per seed and mean."""
    seeds = evidence.seeds_of(args)
    drivers = {(name, seed): SettingDriver(args, seed, name, flags) for name, flags in grid.items() for seed in seeds}
    for driver in drivers.values():
        driver.preflight()
    jobs = {key: (lambda d=driver: d.run_arm(arm), ()) for key, driver in drivers.items()}
    done = run_jobs(jobs, args.jobs)
    results = {}
    for name, flags in grid.items():
        accs = [done[name, seed]["eval"]["validation"]["acc"] for seed in seeds]
        results[name] = {"flags": flags, "validation": dict(zip(map(str, seeds), accs)), "mean": sum(accs) / len(accs)}
        say(f"{arm} {name}: validation {results[name]['mean']:.4f} (seeds {', '.join(f'{a:.4f}' for a in accs)})")
    return results


def best(results: dict[str, dict]) -> str:
    """The best mean; a tie goes to the earlier setting of the grid (the flags' order)."""
    return max(results, key=lambda name: (results[name]["mean"], -list(results).index(name)))


def run(args: TuneArguments) -> dict:
    lrs = [float(v) for v in args.lrs.split(",")]
    margins = [float(v) for v in args.margins.split(",")]
    say(f"\n===== step 1: std-cot at each learning rate ({args.lrs}) =====")
    by_lr = sweep(args, "std-cot", {f"lr{lr:g}": {"learning_rate": lr} for lr in lrs})
    lr = by_lr[best(by_lr)]["flags"]["learning_rate"]
    say(f"\n===== step 2: +reflect at lr {lr:g}, each margin ({args.margins}) =====")
    by_margin = sweep(args, "+reflect", {f"lr{lr:g}-m{m:g}": {"learning_rate": lr, "cl_p": m} for m in margins})
    margin = by_margin[best(by_margin)]["flags"]["cl_p"]
    result = {"lr": lr, "cl_p": margin, "flags": f"--lr {lr:g} --cl_p {margin:g}", "std-cot": by_lr,
              "+reflect": by_margin, "seeds": evidence.seeds_of(args), "task": args.task, "student": args.student,
              "split": "validation", "command": " ".join([sys.executable, *sys.argv])}
    atomic_write_json(Path(args.workdir) / "tuning.json", result)
    say(f"\nchosen on validation: {result['flags']}  ({Path(args.workdir) / 'tuning.json'})")
    return result


@cli_main
def main() -> None:
    argv = sys.argv[1:]
    with driver_exits():
        args = parse(TuneArguments, argv)
        if args.quick:  # reproduce.py --quick's sizes, in a folder of the sweep's own
            workdir = args.workdir
            apply_quick(args, argv)
            args.workdir = workdir if "--workdir" in argv else "runs/tune_quick"
        check_learning_rate(args, ["--lr", "--cl_p"])  # both are what the sweep chooses
        # the sweep reads validation only, and trains round 1 only
        args = replace(args, eval_splits="validation", arms="std-cot,+reflect")
        evidence.check_workdir(args, Path(args.workdir))
        prepare_embedded(args)
        run(args)


if __name__ == "__main__":
    main()
