"""Measure the method's claims: every arm (arms.EVIDENCE_ARMS) over seeds, one table of mean +- std, paired
differences with bootstrap and seed-level t intervals, Holm-corrected, results.json and a plot. The logic is in
evidence.py.

    python reproduce.py                 # the embedded default: wordmath, 5 seeds, all arms, offline, CPU (~31 min)
    python reproduce.py --quick         # the same end to end, 1 seed, small splits, few steps
    python reproduce.py --dry_run       # each seed's teacher requests and cost; sends and writes nothing
    python reproduce.py --task gsm8k --student Qwen/Qwen2.5-1.5B --lr ... --cl_p ... --backend openai ...   # recipes/gsm8k.md
A killed run re-run with the same flags skips every finished stage. tune.py chooses --lr and --cl_p on validation.
"""
from __future__ import annotations

import os
import sys
from dataclasses import fields

import evidence
from common import cli_main
from driver_args import EvidenceArguments
from flags import flags_of, parse
from run_rounds import check_learning_rate, prepare_embedded
from stage_process import driver_exits


def apply_quick(args: EvidenceArguments, argv: list[str]) -> None:
    """--quick's sizes, except for the flags given on the command line."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    by_name = {f.name: f for f in fields(args)}
    for name, value in evidence.QUICK.items():
        if not given & set(flags_of(by_name[name])):
            setattr(args, name, value)
    args.__post_init__()  # the new values meet the same checks


@cli_main
def main() -> None:
    argv = sys.argv[1:]
    with driver_exits():
        args = parse(EvidenceArguments, argv)
        if args.quick:
            apply_quick(args, argv)
        check_learning_rate(args, argv)
        if args.threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the stages inherit it
        evidence.preflight(args)  # every stage's settings and inputs, before anything is written
        if args.dry_run:
            prepare_embedded(args, student=False)  # the questions are counted, not answered
            evidence.dry_run(args)
            return
        prepare_embedded(args)
        evidence.run(args)


if __name__ == "__main__":
    main()
