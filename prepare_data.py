"""Write the embedded offline tasks into localdataset/: each task of tasks.TASKS with a `generator`
(`wordmath`: our generator; `gsm_symbolic`: reasoning-gym), from that module's `splits`.

Three disjoint splits from three seeds: train (--seed), test (--seed + 1, as before the
validation split existed, so earlier test numbers stay comparable) and validation (--seed + 2).
Tuning and checkpoint selection read validation; test is read only for reported numbers.

Idempotent: a split whose file already holds what these settings generate is left alone.
    python prepare_data.py                      # both tasks, default sizes
    python prepare_data.py --task wordmath --train_size 4000 --max_steps 4
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from args import PrepareArguments
from common import UserError, atomic_write_jsonl, cli_main
from flags import parse
from tasks import TASKS


def write_if_changed(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return "up to date"
    atomic_write_jsonl(path, rows)
    return "written"


@cli_main
def main() -> None:
    args = parse(PrepareArguments)
    builders = {name: task.generator for name, task in TASKS.items() if task.generator}
    if args.task != "all" and args.task not in builders:
        raise UserError(f"--task: expected one of {', '.join(builders)} or all, got {args.task!r}")
    if args.train_size < 1 or args.test_size < 1 or args.valid_size < 1:
        raise UserError("--train_size, --valid_size and --test_size must be positive")
    for name in builders if args.task == "all" else [args.task]:
        for split, rows in importlib.import_module(builders[name]).splits(args).items():
            path = Path(args.data_dir) / name / f"{split}.jsonl"
            print(f"{path}: {len(rows)} problems, {write_if_changed(path, rows)}")


if __name__ == "__main__":
    main()
