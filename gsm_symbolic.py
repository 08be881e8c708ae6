"""The embedded `gsm_symbolic` task: GSM8K-style problems with worked solutions from reasoning-gym, offline.

reasoning-gym writes each problem from one of its templates (a generator function, its index the
row's `template`). Two problems of one template differ only in names and numbers, so the splits
are disjoint by template: `template_partition` deals the templates out (`TEMPLATE_SHARES`) and
each split draws only from its own.
"""
from __future__ import annotations

import random

from common import UserError
from wordmath import masked_question  # the same rule for both tasks: every number masked

# Of reasoning-gym's 85 working templates: 13 for validation, 13 for test, 59 for train. Fewer
# evaluation templates would let one template's quirks sway the accuracy; more would thin train.
TEMPLATE_SHARES = {"validation": 0.15, "test": 0.15}
# reasoning-gym draws a template per index: a dataset this many times the wanted size holds enough
# indices of a split's templates (about one in seven for validation and test) to skip repeats.
INDICES_PER_PROBLEM = 20

def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.strip().replace(",", "")) == float(b.strip().replace(",", ""))
    except ValueError:
        return False


def all_templates() -> list[int]:
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    return sorted(tasks_ok)


def template_partition(seed: int) -> dict[str, set[int]]:
    """train, validation and test templates: a shuffle seeded by the prepare seed, cut by TEMPLATE_SHARES."""
    templates = all_templates()
    random.Random(f"gsm_symbolic templates {seed}").shuffle(templates)
    n_valid, n_test = (round(share * len(templates)) for share in TEMPLATE_SHARES.values())
    return {"train": set(templates[n_valid + n_test:]), "validation": set(templates[:n_valid]),
            "test": set(templates[n_valid:n_valid + n_test])}


def draw(size: int, seed: int, templates: set[int], exclude_masked: set[str] = frozenset()) -> list[dict]:
    """`size` distinct problems of `templates`, none whose masked question is in `exclude_masked`."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size * INDICES_PER_PROBLEM, seed=seed)
    rows, seen = [], set()
    for idx, template in enumerate(dataset.task_indices):
        if template not in templates:
            continue  # skipped before generating: another split's template costs nothing
        item = dataset[idx]
        body, _, final = item["metadata"]["answer_cot"].strip().rpartition("####")
        if item["question"] in seen or masked_question(item["question"]) in exclude_masked \
                or not _same_number(final, item["answer"]):
            continue
        seen.add(item["question"])
        cot = f"{body.rstrip()}\n#### {item['answer']}"  # the gold line as reasoning-gym scores it
        rows.append({"question": item["question"], "answer": cot, "template": template})
        if len(rows) == size:
            return rows
    raise UserError(f"gsm_symbolic: could not draw {size} distinct problems of {len(templates)} templates "
                    f"with seed {seed}")


def splits(args) -> dict[str, list[dict]]:
    """train, validation and test for prepare_data.py (its PrepareArguments: sizes, seed), each from its own
    seed and templates, and no evaluation question a train question with other numbers."""
    templates = template_partition(args.seed)
    train = draw(args.train_size, args.seed, templates["train"])
    taken = {masked_question(r["question"]) for r in train}
    test = draw(args.test_size, args.seed + 1, templates["test"], taken)
    validation = draw(args.valid_size, args.seed + 2, templates["validation"],
                      taken | {masked_question(r["question"]) for r in test})
    return {"train": train, "validation": validation, "test": test}
