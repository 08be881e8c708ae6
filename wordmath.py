"""`wordmath`: our own seeded generator of short multi-step word problems (GSM8K row format).

Each problem tracks one quantity through a few operations; its gold rationale writes one
equation per step and ends with `#### <answer>`, like GSM8K. Knobs: number of steps and the
number range. The structured steps are kept in the row (`steps`) so an offline teacher can
check a student's arithmetic step by step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from answers import final_sentence

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Amy", "Jon", "Kim", "Raj", "Lily", "Omar"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Ivy", "Eva", "Amy", "Kim", "Lily"} else "He") for n in NAMES}
ITEMS = ["apples", "stickers", "marbles", "books", "coins", "pens", "cards", "shells", "cookies", "stamps"]
FRIENDS = ["a friend", "a cousin", "a classmate", "a neighbor"]
# Worked solutions vary their wording the way different writers (or a teacher LLM) would, so a
# student trained on them reads any of these as the same reasoning step.
# The offline teacher re-words rationales with the same phrases (teacher_backends.py).
CONNECTORS = [", so ", ", which gives ", "; hence ", ", and so "]
STEP_BY_STEP = "Let's think step by step."
OPENERS = ["", "", STEP_BY_STEP + " "]


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 20      # starting amount drawn from 2..max_start
    max_operand: int = 9     # added/removed amounts drawn from 1..max_operand
    max_factor: int = 3      # multiplication factors drawn from 2..max_factor
    max_value: int = 99      # no intermediate result above this


def _step(rng: random.Random, who: str, item: str, value: int, d: Difficulty):
    """One operation on the running value: (question sentence, rationale sentence, new value)."""
    she = PRONOUN[who]
    kinds = ["add", "add", "sub", "sub", "mul"]
    while True:
        kind = rng.choice(kinds)
        if kind == "add":
            n = rng.randint(1, d.max_operand)
            new = value + n
            q = rng.choice([f"{she} buys {n} more {item}.", f"{she} finds {n} more {item}.",
                            f"{she} gets {n} {item} from {rng.choice(FRIENDS)}."])
            r = f"{she} gets {n} more{rng.choice(CONNECTORS)}{value} + {n} = {new}."
        elif kind == "sub":
            if value < 2:
                continue
            n = rng.randint(1, min(d.max_operand, value - 1))
            new = value - n
            q = rng.choice([f"{she} gives {n} {item} to {rng.choice(FRIENDS)}.", f"{she} loses {n} {item}.",
                            f"{she} sells {n} {item}."])
            r = f"{she} gives away {n}{rng.choice(CONNECTORS)}{value} - {n} = {new}."
        else:
            n = rng.randint(2, d.max_factor)
            new = value * n
            word = {2: "doubles", 3: "triples"}.get(n, f"multiplies by {n}")
            q = f"Then the number of {item} {word}."
            r = f"The number {word}{rng.choice(CONNECTORS)}{value} * {n} = {new}."
        if 0 < new <= d.max_value:
            return q, r, new, [value, {"add": "+", "sub": "-", "mul": "*"}[kind], n, new]


def make_problem(rng: random.Random, d: Difficulty) -> dict:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, d.max_start)
    question = [f"{who} has {value} {item}."]
    rationale = [f"{rng.choice(OPENERS)}{who} starts with {value} {item}."]
    steps = []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        q, r, value, step = _step(rng, who, item, value, d)
        question.append(q)
        rationale.append(r)
        steps.append(step)
    question.append(f"How many {item} does {who} have now?")
    rationale.append(final_sentence(str(value)))
    return {"question": " ".join(question), "answer": " ".join(rationale) + f"\n#### {value}", "steps": steps}


def generate(n: int, seed: int, d: Difficulty = Difficulty(), exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct problems; questions in `exclude` (e.g. the train split) are skipped."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"cannot generate {n} distinct problems at this difficulty")
        row = make_problem(rng, d)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def splits(args) -> dict[str, list[dict]]:
    """train, validation and test for prepare_data.py (its PrepareArguments: sizes, seed, difficulty)."""
    difficulty = Difficulty(min_steps=args.min_steps, max_steps=args.max_steps,
                            max_start=args.max_start, max_operand=args.max_operand)
    train = generate(args.train_size, args.seed, difficulty)
    test = generate(args.test_size, args.seed + 1, difficulty, exclude={r["question"] for r in train})
    validation = generate(args.valid_size, args.seed + 2, difficulty, exclude={r["question"] for r in train + test})
    return {"train": train, "validation": validation, "test": test}
