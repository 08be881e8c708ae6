"""Write the embedded offline tasks into localdataset/: each task of tasks.TASKS with a `generator`
(`wordmath`: our generator; `gsm_symbolic`: reasoning-gym), from that module's `splits`.

Three disjoint splits from three seeds: train (--seed), test (--seed + 1, as before the
validation split existed) and validation (--seed + 2). Tuning and checkpoint selection read
validation; test is read only for reported numbers.

Disjoint means more than distinct questions: no two splits share a template (each row's
`template`) or a question with its numbers masked (the module's `masked_question`), so validation
and test measure problems the student never saw with other numbers. `split_leaks` checks it, and
splits that fail are not written.

Idempotent: a split whose file already holds what these settings generate is left alone.
    python prepare_data.py                      # both tasks, default sizes
    python prepare_data.py --task wordmath --train_size 4000 --max_steps 4
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

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


# every pair of splits, the earlier one first: what validation or test shares with train leaks into
# training, and what test shares with validation leaks into the choices made on validation
SPLIT_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))


def split_leaks(splits: dict[str, list[dict]], masked_question: Callable[[str], str]) -> list[str]:
    """One line per way a later split overlaps an earlier one: rows sharing a template, a masked question
    or the question itself. Empty when the splits are disjoint."""
    keys = {"template": lambda row: row["template"], "masked question": lambda row: masked_question(row["question"]),
            "question": lambda row: row["question"]}
    problems = []
    for earlier, later in SPLIT_PAIRS:
        for what, key in keys.items():
            taken = {key(row) for row in splits[earlier]}
            shared = [row for row in splits[later] if key(row) in taken]
            if shared:
                example = str(key(shared[0]))
                problems.append(f"{len(shared)} of {len(splits[later])} {later} rows share a {what} with {earlier} "
                                f"(e.g. {example[:60] + '...' * (len(example) > 60)!r})")
    return problems


def build(task_names: list[str], generators: dict[str, str],
          args: PrepareArguments) -> dict[str, dict[str, list[dict]]]:
    """Every task's splits, checked: one leaking task stops them all before anything is written."""
    built = {}
    for name in task_names:
        module = importlib.import_module(generators[name])
        built[name] = module.splits(args)
        leaks = split_leaks(built[name], module.masked_question)
        if leaks:
            raise UserError(f"{name}: the splits leak, nothing written: {'; '.join(leaks)}")
    return built


@cli_main
def main() -> None:
    args = parse(PrepareArguments)
    generators = {name: task.generator for name, task in TASKS.items() if task.generator}
    if args.task != "all" and args.task not in generators:
        raise UserError(f"--task: expected one of {', '.join(generators)} or all, got {args.task!r}")
    if args.train_size < 1 or args.test_size < 1 or args.valid_size < 1:
        raise UserError("--train_size, --valid_size and --test_size must be positive")
    built = build(list(generators) if args.task == "all" else [args.task], generators, args)
    for name, splits in built.items():
        for split, rows in splits.items():
            path = Path(args.data_dir) / name / f"{split}.jsonl"
            print(f"{path}: {len(rows)} problems, {write_if_changed(path, rows)}")


if __name__ == "__main__":
    main()
