"""Write the embedded offline tasks into localdataset/: `wordmath` (our generator) and `gsm_symbolic` (reasoning-gym).

Three disjoint splits from three seeds: train (--seed), test (--seed + 1, as before the
validation split existed, so earlier test numbers stay comparable) and validation (--seed + 2).
Tuning and checkpoint selection read validation; test is read only for reported numbers.

Idempotent: a split whose file already holds what these settings generate is left alone.
    python prepare_data.py                      # both tasks, default sizes
    python prepare_data.py --task wordmath --train_size 4000 --max_steps 4
"""
from __future__ import annotations

import json
from pathlib import Path

import wordmath
from args import PrepareArguments
from common import UserError, atomic_write_jsonl, cli_main
from flags import parse


def wordmath_splits(args: PrepareArguments) -> dict[str, list[dict]]:
    difficulty = wordmath.Difficulty(min_steps=args.min_steps, max_steps=args.max_steps,
                                     max_start=args.max_start, max_operand=args.max_operand)
    train = wordmath.generate(args.train_size, args.seed, difficulty)
    test = wordmath.generate(args.test_size, args.seed + 1, difficulty, exclude={r["question"] for r in train})
    validation = wordmath.generate(args.valid_size, args.seed + 2, difficulty,
                                   exclude={r["question"] for r in train + test})
    return {"train": train, "validation": validation, "test": test}


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.strip().replace(",", "")) == float(b.strip().replace(",", ""))
    except ValueError:
        return False


def gsm_symbolic_splits(args: PrepareArguments) -> dict[str, list[dict]]:
    import reasoning_gym

    def rows(size: int, seed: int, exclude: set[str]) -> list[dict]:
        out = []
        for item in reasoning_gym.create_dataset("gsm_symbolic", size=size + len(exclude) // 10 + 50, seed=seed):
            body, _, final = item["metadata"]["answer_cot"].strip().rpartition("####")
            if item["question"] in exclude or not _same_number(final, item["answer"]):
                continue
            cot = f"{body.rstrip()}\n#### {item['answer']}"  # the gold line as reasoning-gym scores it
            exclude.add(item["question"])
            out.append({"question": item["question"], "answer": cot})
            if len(out) == size:
                return out
        raise UserError(f"gsm_symbolic: could not draw {size} distinct problems with seed {seed}")

    seen: set[str] = set()
    train = rows(args.train_size, args.seed, seen)
    test = rows(args.test_size, args.seed + 1, seen)
    validation = rows(args.valid_size, args.seed + 2, seen)
    return {"train": train, "validation": validation, "test": test}


def write_if_changed(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return "up to date"
    atomic_write_jsonl(path, rows)
    return "written"


@cli_main
def main() -> None:
    args = parse(PrepareArguments)
    builders = {"wordmath": wordmath_splits, "gsm_symbolic": gsm_symbolic_splits}
    if args.task != "all" and args.task not in builders:
        raise UserError(f"--task: expected one of {', '.join(builders)} or all, got {args.task!r}")
    if args.train_size < 1 or args.test_size < 1 or args.valid_size < 1:
        raise UserError("--train_size, --valid_size and --test_size must be positive")
    for name in builders if args.task == "all" else [args.task]:
        for split, rows in builders[name](args).items():
            path = Path(args.data_dir) / name / f"{split}.jsonl"
            print(f"{path}: {len(rows)} problems, {write_if_changed(path, rows)}")


if __name__ == "__main__":
    main()
