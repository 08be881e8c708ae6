"""The embedded `gsm_symbolic` task: GSM8K-style problems with worked solutions from reasoning-gym, offline."""
from __future__ import annotations

from common import UserError


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.strip().replace(",", "")) == float(b.strip().replace(",", ""))
    except ValueError:
        return False


def splits(args) -> dict[str, list[dict]]:
    """train, validation and test for prepare_data.py (its PrepareArguments: sizes, seed), disjoint."""
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
