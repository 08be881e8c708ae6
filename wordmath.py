"""`wordmath`: our own seeded generator of short multi-step word problems (GSM8K row format).

Each problem tracks one quantity through a few operations; its gold rationale writes one
equation per step and ends with `#### <answer>`, like GSM8K. Knobs: number of steps and the
number range. The structured steps are kept in the row (`steps`) so an offline teacher can
check a student's arithmetic step by step.

Splits are disjoint by template: a problem's template is its question with every number masked
(`masked_question`), and a stable hash of the template decides the one split it may appear in
(`split_of`, shares in `SPLIT_SHARES`). Each split's generator draws problems as always and keeps
only those of its own templates, so no evaluation problem is a train problem with other numbers.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

from answers import final_sentence
from common import UserError

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Amy", "Jon", "Kim", "Raj", "Lily", "Omar"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Ivy", "Eva", "Amy", "Kim", "Lily"} else "He") for n in NAMES}
ITEMS = ["apples", "stickers", "marbles", "books", "coins", "pens", "cards", "shells", "cookies", "stamps"]
FRIENDS = ["a friend", "a cousin", "a classmate", "a neighbor"]
# Worked solutions vary their wording the way different writers (or a teacher LLM) would, so a
# student trained on them reads any of these as the same reasoning step.
# The offline teacher re-words rationales with the same phrases (offline_teacher.py).
CONNECTORS = [", so ", ", which gives ", "; hence ", ", and so "]
STEP_BY_STEP = "Let's think step by step."
OPENERS = ["", "", STEP_BY_STEP + " "]

NUMBER = re.compile(r"\d+(?:[.,]\d+)*")  # 1,234 and 2.5 are one number each
# The templates are split, not the problems: a hash bucket holds every difficulty in the same
# proportion, so the steps mix stays the same in all three splits. 15% is enough for evaluation:
# even with 1-step problems only (2,240 templates), 15% of them with their numbers hold far more
# than 1000 distinct questions.
SPLIT_SHARES = {"train": 0.70, "validation": 0.15, "test": 0.15}


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 1
    max_steps: int = 4
    max_start: int = 50      # starting amount drawn from 2..max_start
    max_operand: int = 20    # added/removed amounts drawn from 1..max_operand
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
    text = " ".join(question)
    return {"question": text, "answer": " ".join(rationale) + f"\n#### {value}", "steps": steps,
            "template": masked_question(text)}


def masked_question(question: str) -> str:
    """The question with every number as `#`: two problems that differ only in their numbers share it."""
    return NUMBER.sub("#", question)


def split_of(template: str, seed: int) -> str:
    """The one split a template belongs to, the same on every machine and Python run (hashlib, not the
    salted hash()); the seed salts it so another --seed partitions the templates anew."""
    digest = hashlib.sha256(f"{seed}\0{template}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2 ** 64
    for split, upper in zip(SPLIT_SHARES, accumulate(SPLIT_SHARES.values())):
        if point < upper:
            return split
    return split  # the shares sum to 1.0 only up to float rounding


def generate(n: int, seed: int, d: Difficulty = Difficulty(), exclude: set[str] = frozenset(),
             keep: Callable[[dict], bool] = lambda row: True) -> list[dict]:
    """n distinct problems; questions in `exclude` are skipped, and so are rows `keep` refuses (another split's)."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    # validation and test keep about one draw in seven (the rest is another split's): the budget counts every draw
    for _ in range(500 * n):
        row = make_problem(rng, d)
        if row["question"] not in seen and keep(row):
            seen.add(row["question"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise UserError(f"wordmath: cannot generate {n} distinct problems of one split at this difficulty "
                    f"(raise --max_steps, --max_start or --max_operand)")


def splits(args) -> dict[str, list[dict]]:
    """train, validation and test for prepare_data.py (its PrepareArguments: sizes, seed, difficulty), each
    from its own seed and holding only the templates `split_of` gives it."""
    difficulty = Difficulty(min_steps=args.min_steps, max_steps=args.max_steps,
                            max_start=args.max_start, max_operand=args.max_operand)

    def draw(split: str, size: int, seed: int) -> list[dict]:
        return generate(size, seed, difficulty, keep=lambda row: split_of(row["template"], args.seed) == split)

    # seeds as before the partition: test seed + 1, validation seed + 2
    return {"train": draw("train", args.train_size, args.seed),
            "validation": draw("validation", args.valid_size, args.seed + 2),
            "test": draw("test", args.test_size, args.seed + 1)}
