"""Training rows from teacher files, triplet candidates, the unique-question batch sampler, collators."""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import student  # noqa: E402
import tasks  # noqa: E402
import wordmath  # noqa: E402
from common import UserError  # noqa: E402
from reference import FivePassCollator  # noqa: E402
from train_batches import TailoredCollator, TailoredDataset, UniqueQuestionBatchSampler  # noqa: E402
from train_data import build_train_data, encode_pair, wrong_continuation  # noqa: E402

TASK = tasks.get_task("wordmath")


# ---------------------------------------------------------------- fixtures shared with test_losses.py

def make_examples(n: int = 300, seed: int = 11) -> list[tasks.Example]:
    return [TASK.convert(row) for row in wordmath.generate(n, seed=seed)]


def make_tokenizer(examples: list[tasks.Example]):
    texts = [tasks.build_prompt(TASK, ex) + tasks.continuation(TASK, ex, ex.rationale) for ex in examples]
    return student.train_tokenizer(texts, vocab_size=384)


def steps_of(ex: tasks.Example) -> str:
    """The gold rationale without its closing 'Therefore, the answer is N.' sentence."""
    return re.sub(r"\s*Therefore, the answer is [^.]*\.$", "", tasks.fold(ex.rationale))


def teacher_rationale(ex: tasks.Example, opener: str = "", answer: str | None = None) -> str:
    return f"{opener}{steps_of(ex)} Therefore, the answer is {answer or ex.gold}."


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def triplet_files(tmp: Path, examples: list[tasks.Example]) -> tuple[str, str, str]:
    """Teacher/positive and negative files over the first 12 questions, with every awkward case:

    q0: two rationales + one wrong-answer one; q1: one rationale only (no distinct positive);
    q2: object-form items; q3..q11: two rationales; negatives for all but q4 (no negative);
    q5's only negative is actually right (dropped)."""
    teacher: dict[str, list] = {}
    for i, ex in enumerate(examples[:12]):
        teacher[ex.question] = [teacher_rationale(ex), teacher_rationale(ex, "Step by step. ")]
    teacher[examples[0].question].append(teacher_rationale(examples[0], answer="100000"))
    teacher[examples[1].question] = teacher[examples[1].question][:1]
    teacher[examples[2].question] = [{"question": examples[2].question, "answer": t, "final_ans": examples[2].gold}
                                     for t in teacher[examples[2].question]]
    negatives = {ex.question: [f"{steps_of(ex)}\nAnswer: 100000", "I guess 100001."]
                 for i, ex in enumerate(examples[:12]) if i != 4}
    negatives[examples[5].question] = [f"{steps_of(examples[5])}\nAnswer: {examples[5].gold}"]
    path = write_json(tmp / "teacher.json", teacher)
    return path, path, write_json(tmp / "neg.json", negatives)


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def tokenizer(examples):
    return make_tokenizer(examples)


@pytest.fixture(scope="module")
def triplet_data(tmp_path_factory, examples, tokenizer):
    teacher, pos, neg = triplet_files(tmp_path_factory.mktemp("files"), examples)
    return build_train_data(TASK, examples, tokenizer, teacher_data=teacher, cl_pos_path=pos, cl_neg_path=neg)


# ---------------------------------------------------------------- rows from teacher files

def test_filtering_counts_and_absent_questions(triplet_data, examples):
    counts = triplet_data.counts
    assert counts["questions_in_split"] == 300
    assert counts["questions_absent_from_file"] == 288       # train questions not in the file are dropped
    assert counts["rationales_wrong_answer"] == 1             # q0's wrong-answer rationale
    assert counts["rows"] == counts["rationales_kept"] == 23  # 12 questions x 2, minus q1's second
    assert triplet_data.questions == [ex.question for ex in examples[:12]]
    assert Counter(r.qid for r in triplet_data.rows)[0] == 2


def test_object_form_items_are_read(triplet_data, examples):
    rows = [r for r in triplet_data.rows if r.qid == 2]
    assert len(rows) == 2 and all(examples[2].gold in r.text for r in rows)


def test_row_is_the_whole_text_split_at_the_prompt(triplet_data, tokenizer, examples):
    row = triplet_data.rows[0]
    ex = examples[0]
    prefix = tasks.build_prompt(TASK, ex, rationale=True)
    assert row.prefix_ids == tokenizer(prefix)["input_ids"]
    assert row.cont_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row.cont_ids[:-1]) == tasks.continuation(TASK, ex, teacher_rationale(ex))
    assert row.prefix_ids + row.cont_ids[:-1] == tokenizer(prefix + row.text)["input_ids"]
    assert prefix.endswith("Reasoning:") and row.text.startswith(" ")


def test_not_an_object_file_is_a_user_error(tmp_path, examples, tokenizer):
    bad = write_json(tmp_path / "list.json", [["a rationale"]])
    with pytest.raises(UserError, match="list.json.*JSON object"):
        build_train_data(TASK, examples, tokenizer, teacher_data=bad)
    bad = write_json(tmp_path / "str.json", {examples[0].question: "not a list"})
    with pytest.raises(UserError, match="str.json"):
        build_train_data(TASK, examples, tokenizer, teacher_data=bad)


def test_nothing_left_is_a_user_error(tmp_path, examples, tokenizer):
    wrong = write_json(tmp_path / "wrong.json", {ex.question: [teacher_rationale(ex, answer="100000")]
                                                 for ex in examples[:5]})
    with pytest.raises(UserError, match="wrong.json"):
        build_train_data(TASK, examples, tokenizer, teacher_data=wrong)
    unknown = write_json(tmp_path / "unknown.json", {"Not a train question?": ["x"]})
    with pytest.raises(UserError, match="unknown.json"):
        build_train_data(TASK, examples, tokenizer, teacher_data=unknown)


def test_answer_only_rows(examples, tokenizer):
    data = build_train_data(TASK, examples[:10], tokenizer)
    assert len(data.rows) == 10
    ex, row = examples[3], data.rows[3]
    assert tokenizer.decode(row.prefix_ids) == f"Question: {ex.question}\nAnswer:"
    assert tokenizer.decode(row.cont_ids[:-1]) == " " + ex.gold


def test_truncation_cuts_prefix_left_then_continuation_right(tokenizer):
    prefix, cont = "Question: " + "one two three " * 20 + "\nReasoning:", " four five six" * 20
    full_p = tokenizer(prefix)["input_ids"]
    full_c = tokenizer(prefix + cont)["input_ids"][len(full_p):] + [tokenizer.eos_token_id]
    p, c, cut = encode_pair(tokenizer, prefix, cont, max_length=len(full_p) + len(full_c) - 5)
    assert cut and c == full_c and p == full_p[5:]            # demos/question side loses first
    p, c, cut = encode_pair(tokenizer, prefix, cont, max_length=40)
    assert cut and len(p) + len(c) == 40 and p == full_p[-20:] and c == full_c[:20]


# ---------------------------------------------------------------- triplet candidates

def test_positive_is_distinct_and_negative_present(triplet_data, tokenizer, examples):
    ds = TailoredDataset(triplet_data, seed=3)
    seen_pos = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            f = ds[i]
            row = triplet_data.rows[i]
            if row.qid in (1, 4, 5):                          # no distinct positive / no negative
                assert f["pos_ids"] is None and f["neg_ids"] is None
                continue
            assert f["pos_ids"] is not None and f["pos_ids"] != f["cont_ids"]
            assert tokenizer.decode(f["pos_ids"][:-1]) != row.text
            ex = examples[row.qid]  # default --cl_neg_form original: the student's whole text + the gold answer line
            assert tokenizer.decode(f["neg_ids"][:-1]) in {tasks.continuation(TASK, ex, f"{steps_of(ex)}\nAnswer: 100000"),
                                                           tasks.continuation(TASK, ex, "I guess 100001")}  # cleaned
            seen_pos.add((i, tuple(f["neg_ids"])))
    assert triplet_data.counts["rows_with_triplet"] == 23 - 1 - 2 - 2
    assert triplet_data.counts["negatives_dropped"] == 1     # q5's "negative" has the right answer
    assert len({n for _, n in seen_pos}) > 1                  # the negative draw varies


def test_dataset_draw_is_deterministic(triplet_data):
    a, b = TailoredDataset(triplet_data, seed=1), TailoredDataset(triplet_data, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


def test_candidate_limits(tmp_path, examples, tokenizer):
    ex = examples[0]
    many = {ex.question: [teacher_rationale(ex, f"Try {k}. ") for k in range(15)]}
    negs = {ex.question: [f"Guess {k}.\nAnswer: {100000 + k}" for k in range(9)]}
    data = build_train_data(TASK, examples, tokenizer, teacher_data=write_json(tmp_path / "t.json", many),
                            cl_pos_path=str(tmp_path / "t.json"), cl_neg_path=write_json(tmp_path / "n.json", negs),
                            cl_pos_num=10, cl_neg_num=4)
    assert len(data.positives[0]) == 10 and len(data.negatives[0]) == 4


def test_wrong_continuation_own_form_keeps_the_students_answer():
    ex = tasks.Example("Q?", "7")
    assert wrong_continuation(TASK, ex, "He has 3 + 4 = 8.\nAnswer: 8\n\nQuestion: next", "own") == " He has 3 + 4 = 8.\nAnswer: 8"
    assert wrong_continuation(TASK, ex, "He has  7\nthings.", "own") == " He has 7 things."


def test_wrong_continuation_gold_form_is_the_students_reasoning_with_the_gold_line():
    ex = tasks.Example("Q?", "7")
    assert wrong_continuation(TASK, ex, "He has 3 + 4 = 8.\nAnswer: 8\n\nQuestion: next", "gold") == " He has 3 + 4 = 8.\nAnswer: 7"
    assert wrong_continuation(TASK, ex, "He has  3 +\n4 = 8.", "gold") == " He has 3 + 4 = 8.\nAnswer: 7"
    # the same target a teacher rationale with that reasoning gets
    assert wrong_continuation(TASK, ex, "He has 3 + 4 = 8.\nAnswer: 8", "gold") == tasks.continuation(TASK, ex, "He has 3 + 4 = 8.")


def test_gold_form_negatives_are_filtered_on_the_students_own_answer(tmp_path):
    examples = make_examples(20)
    tokenizer = make_tokenizer(examples)
    ex = examples[0]
    right = f"{steps_of(ex)}\nAnswer: {ex.gold}"
    wrong = f"{steps_of(ex)} plus one.\nAnswer: {int(ex.gold) + 1}"
    teacher = write_json(tmp_path / "t.json", {ex.question: [right, right + " Done."]})
    negs = write_json(tmp_path / "n.json", {ex.question: [right, wrong]})
    for form in ("gold", "own"):
        data = build_train_data(TASK, examples, tokenizer, teacher_data=teacher, cl_pos_path=teacher, cl_neg_path=negs,
                                cl_neg_form=form)
        assert data.counts["negatives_dropped"] == 1 and len(data.negatives[0]) == 1  # the right one goes either way
        text = tokenizer.decode(data.negatives[0][0][:-1])
        expected = wrong_continuation(TASK, ex, wrong, form)
        assert text == expected and text.endswith(f"Answer: {ex.gold if form == 'gold' else int(ex.gold) + 1}")


# ---------------------------------------------------------------- batch sampler

def skewed_questions() -> list[str]:
    """One question with 12 rows, ten with one or two."""
    return ["big"] * 12 + [f"q{i}" for i in range(10) for _ in range(1 + i % 2)]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
def test_sampler_unique_questions_and_coverage(batch_size):
    questions = skewed_questions()
    sampler = UniqueQuestionBatchSampler(questions, batch_size, seed=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b) == batch_size for b in batches)
        assert all(len({questions[i] for i in b}) == batch_size for b in batches)
        seen = Counter(i for b in batches for i in b)
        assert set(seen) == set(range(len(questions)))        # every row, every epoch
        fillers = len(sampler) * batch_size - len(questions)
        assert sum(seen.values()) - len(questions) == fillers


def test_sampler_exact_cover_when_divisible():
    questions = [f"q{i // 3}" for i in range(24)]             # 8 questions x 3 rows, batch 4: no fillers
    batches = list(UniqueQuestionBatchSampler(questions, 4, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(24))


def test_sampler_deterministic_by_seed_and_epoch():
    questions = skewed_questions()
    a, b = UniqueQuestionBatchSampler(questions, 4, seed=5), UniqueQuestionBatchSampler(questions, 4, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(UniqueQuestionBatchSampler(questions, 4, seed=6)) != list(b)


def test_sampler_refuses_batches_larger_than_questions():
    with pytest.raises(UserError, match="distinct"):
        UniqueQuestionBatchSampler(["a", "a", "b"], 3)


# ---------------------------------------------------------------- collators

def test_tailored_collator_layout(triplet_data, tokenizer):
    ds = TailoredDataset(triplet_data)
    features = [ds[i] for i in range(6)]
    batch = TailoredCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive=True)(features)
    prefix_mask, cont_mask = batch["prefix_mask"], batch["cont_mask"]
    width = batch["prefix_ids"].shape[1]
    assert (prefix_mask[:, -1] == 1).all() and (cont_mask[:, 0] == 1).all()  # every prefix ends at column P-1
    for i, f in enumerate(features):
        n_p, n_c = len(f["prefix_ids"]), len(f["cont_ids"])
        assert batch["prefix_ids"][i, width - n_p:].tolist() == f["prefix_ids"]
        assert prefix_mask[i].tolist() == [0] * (width - n_p) + [1] * n_p
        assert batch["cont_ids"][i, :n_c].tolist() == f["cont_ids"] and cont_mask[i].sum() == n_c
        positions = batch["position_ids"][i]
        assert positions[width - n_p:width + n_c].tolist() == list(range(n_p + n_c))
        for k, key in ((0, "pos_ids"), (1, "neg_ids")):
            row = 2 * i + k
            seq = f[key] if f[key] is not None else [tokenizer.eos_token_id]
            assert batch["contrast_ids"][row, :len(seq)].tolist() == seq
            assert batch["contrast_position_ids"][row, :len(seq)].tolist() == list(range(n_p, n_p + len(seq)))
        assert batch["triplet_mask"][i] == float(f["pos_ids"] is not None)


def test_five_pass_collator_layout(triplet_data, tokenizer):
    features = [TailoredDataset(triplet_data)[i] for i in range(4)]
    batch = FivePassCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive=True)(features)
    for i, f in enumerate(features):
        n = len(f["prefix_ids"]) + len(f["cont_ids"])
        assert batch["full_ids"][i, :n].tolist() == f["prefix_ids"] + f["cont_ids"]
        assert batch["full_cont_mask"][i].sum() == len(f["cont_ids"])
        assert batch["prefix_mask"][i, -1] == 1
    assert torch.equal(batch["anchor_ids"][:, 0], torch.tensor([f["cont_ids"][0] for f in features]))
