"""Training data for the student: rows from teacher rationales, and their triplet candidates.

Nothing here knows about the HF Trainer: `run_trainer.py` builds a `TrainData` with
`build_train_data`; train_batches.py turns it into a dataset, batches and collated tensors.

Row = one (question, teacher rationale) pair:
    prefix       = tasks.build_prompt(task, ex, demos, rationale=True)   (the inference prompt)
    continuation = tasks.continuation(task, ex, rationale) + eos
The prefix is tokenized as generation tokenizes the prompt, the continuation as the tokenizer
splits the whole text after it (`PairEncoder`). Answer-only mode (no teacher file) uses
`tasks.continuation(task, ex, None)` with the dataset's gold.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, get_args

import tasks
from answers import ANSWER_MARKER, answer_line, cut_at_blank_line
from args import NegForm
from common import UserError, read_json
from tasks import Example, TaskSpec


# ---------------------------------------------------------------- reading {question: [rationale, ...]} files

def read_rationale_file(path: str, flag: str) -> dict[str, list]:
    """The seed format: a JSON object {question: [rationale | {"answer": rationale, ...}, ...]}."""
    data = read_json(path, f"{flag} file")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"{flag}: {path}: expected a JSON object {{question: [rationale, ...]}}")
    for question, items in data.items():
        for text in (question, *(item_text(item) or "" for item in items)):
            problem = tasks.text_problem(text)
            if problem:
                raise UserError(f"{flag}: {path}: under question {question[:60]!r}: {problem}")
    return data


def item_text(item: Any) -> str | None:
    """Rationale text of one item: a plain string, or an object's `answer` (seed object form)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("answer"), str):
        return item["answer"]
    return None


def is_correct(task: TaskSpec, ex: Example, rationale: str) -> bool:
    """The rationale's own final answer (flexible extraction) equals the gold answer."""
    return tasks.answers_match(task, tasks.extract_answer(task, rationale), ex.gold)


NEG_FORMS = get_args(NegForm)


def wrong_continuation(task: TaskSpec, ex: Example, text: str, form: str = "original") -> str:
    """A student's wrong rationale (already known to be wrong) as a negative continuation.

    original: the whole text (cleaned: answers.KINDS), its own answer line folded in, then the answer line with
          the GOLD answer: exactly what a teacher rationale with that text becomes (the original
          passed --cl_neg_path through the teacher preprocessing), e.g. " ... = 8. Answer: 8\nAnswer: 7";
    gold: its reasoning with its own answer line replaced by the gold one (" ... = 8.\nAnswer: 7");
    own:  its reasoning with its own (wrong) answer line kept, so the whole negative is the mistake.
    Choice tasks have no separate answer line: every form is the folded text."""
    if form not in NEG_FORMS:
        raise UserError(f"--cl_neg_form must be one of {', '.join(NEG_FORMS)}, got {form!r}")
    text = cut_at_blank_line(text)
    if not task.answers.has_answer_line:
        return tasks.as_continuation(tasks.fold(text))
    if form == "original":  # as the original's exam kept it: cut right after the answer it read
        return tasks.continuation(task, ex, task.answers.clean(text))
    reasoning, marker, answer = text.partition(ANSWER_MARKER)
    if form == "gold":
        return tasks.continuation(task, ex, reasoning)
    if not marker:
        return tasks.as_continuation(tasks.fold(reasoning))
    return tasks.as_continuation(tasks.fold(reasoning) + answer_line(tasks.fold(answer.lstrip(":"))))


def _by_question(data: dict[str, list]) -> dict[str, list]:
    # Keys are matched on folded text, as the teacher does, so stray whitespace never drops a question.
    merged: dict[str, list] = {}
    for question, items in data.items():
        merged.setdefault(tasks.fold(question), []).extend(items)
    return merged


# ---------------------------------------------------------------- tokenization

def leading_special_count(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before every text."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return next((lead for lead in range(len(with_special) - len(plain) + 1)
                 if with_special[lead:lead + len(plain)] == plain), 0)


class PairEncoder:
    """Token ids of (prompt, continuation) pairs as the tokenizer splits the whole text.

    The prompt's ids are exactly what generation feeds the model (`tokenizer(prompt)`, BOS and all);
    the continuation's are the rest of `tokenizer(prompt + continuation)`, so a training row is the
    sequence the tokenizer itself produces: no lone space token at the boundary (byte-level BPE),
    no doubled "▁" (SentencePiece, which would prefix a continuation tokenized alone). When a token
    straddles the boundary the continuation is tokenized alone, and `fallbacks` counts it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lead = leading_special_count(tokenizer)
        self.fallbacks = 0
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt(self, text: str) -> list[int]:
        if text not in self._prompt_ids:
            self._prompt_ids[text] = self.tokenizer(text)["input_ids"]
        return self._prompt_ids[text]

    def continuation(self, prompt: str, text: str) -> list[int]:
        """Continuation ids in context, without eos."""
        prompt_ids = self.prompt(prompt)
        whole = self.tokenizer(prompt + text)["input_ids"]
        if whole[:len(prompt_ids)] == prompt_ids:
            return whole[len(prompt_ids):]
        self.fallbacks += 1
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def pair(self, prompt: str, text: str, max_length: int) -> tuple[list[int], list[int], bool]:
        """(prompt ids, continuation ids + eos, truncated?).

        Over max_length: the prompt loses tokens on the left (the demos' side) down to half the
        budget, keeping its leading BOS as generation's left truncation does; then the
        continuation loses tokens on the right."""
        prompt_ids = self.prompt(prompt)
        cont_ids = self.continuation(prompt, text) + [self.tokenizer.eos_token_id]
        if len(prompt_ids) + len(cont_ids) <= max_length:
            return prompt_ids, cont_ids, False
        keep = max(max_length - len(cont_ids), min(len(prompt_ids), max_length // 2), self.lead + 1)
        prompt_ids = prompt_ids[:self.lead] + prompt_ids[len(prompt_ids) - keep + self.lead:]
        return prompt_ids, cont_ids[:max(1, max_length - len(prompt_ids))], True

    def candidate(self, prompt: str, text: str, budget: int) -> list[int]:
        """A positive or negative continuation (+ eos) cut to the row's remaining budget."""
        return (self.continuation(prompt, text) + [self.tokenizer.eos_token_id])[:max(1, budget)]


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int) -> tuple[list[int], list[int], bool]:
    return PairEncoder(tokenizer).pair(prompt, continuation, max_length)


# ---------------------------------------------------------------- rows

@dataclass
class TrainRow:
    qid: int                 # index into TrainData.questions
    prefix_ids: list[int]
    cont_ids: list[int]      # ends with eos (unless truncated)
    text: str                # continuation text, to tell a distinct positive from the row's own


@dataclass
class TrainData:
    rows: list[TrainRow]
    questions: list[str]
    positives: list[list[tuple[str, list[int]]]] = field(default_factory=list)  # per qid: (text, ids)
    negatives: list[list[list[int]]] = field(default_factory=list)              # per qid: ids
    counts: dict = field(default_factory=dict)

    def positive_candidates(self, row: TrainRow) -> list[list[int]]:
        return [ids for text, ids in self.positives[row.qid] if text != row.text] if self.positives else []


def _select(items: list, limit: int, seed: int, question: str) -> list:
    """At most `limit` items, a seeded sample that keeps file order (the original sampled unseeded)."""
    if len(items) <= limit:
        return items
    keep = sorted(random.Random(f"{seed}:{question}").sample(range(len(items)), limit))
    return [items[i] for i in keep]


def build_train_data(task: TaskSpec, examples: list[Example], tokenizer, *, teacher_data: str | None = None,
                     demos: str = "", max_length: int = 1024, cl_pos_path: str | None = None,
                     cl_neg_path: str | None = None, cl_pos_num: int = 10, cl_neg_num: int = 4,
                     seed: int = 42, cl_neg_form: str = "original", answer_filter: bool = True) -> TrainData:
    """Rows for the train split plus per-question triplet candidates, and counts for the log.

    teacher_data None: answer-only rows from the dataset's gold. Otherwise one row per teacher
    rationale; train questions absent from the file are dropped. Positives (`cl_pos_path`, same
    format, de-duplicated, at most cl_pos_num) and negatives (`cl_neg_path`, at most cl_neg_num,
    shaped by `cl_neg_form`) are kept per question; the dataset picks one of each per row and epoch.
    answer_filter: also drop teacher rationales and positives whose final answer is not gold, and
    negatives whose answer is (the original trusted its files and checked none of them)."""
    counts: Counter = Counter(questions_in_split=len(examples))
    questions: list[str] = []
    rows: list[TrainRow] = []
    prefixes: list[str] = []
    by_question = {tasks.fold(ex.question): ex for ex in examples}
    encoder = PairEncoder(tokenizer)

    def add_row(ex: Example, prefix: str, continuation: str, qid: int) -> None:
        prefix_ids, cont_ids, truncated = encoder.pair(prefix, continuation, max_length)
        counts["rows_truncated"] += truncated
        rows.append(TrainRow(qid, prefix_ids, cont_ids, continuation))

    if teacher_data is None:
        for ex in examples:
            questions.append(ex.question)
            prefixes.append(tasks.build_prompt(task, ex, demos, rationale=False))
            add_row(ex, prefixes[-1], tasks.continuation(task, ex, None), len(questions) - 1)
    else:
        data = _by_question(read_rationale_file(teacher_data, "--teacher_data"))
        counts["file_questions_not_in_split"] = sum(q not in by_question for q in data)
        for ex in examples:
            items = data.get(tasks.fold(ex.question))
            if items is None:
                counts["questions_absent_from_file"] += 1
                continue
            kept = []
            for item in items:
                text = item_text(item)
                if text is None:
                    counts["rationales_malformed"] += 1
                elif answer_filter and not is_correct(task, ex, text):
                    counts["rationales_wrong_answer"] += 1
                else:
                    kept.append(text)
            if not kept:
                continue
            questions.append(ex.question)
            prefixes.append(tasks.build_prompt(task, ex, demos, rationale=True))
            for text in kept:
                add_row(ex, prefixes[-1], tasks.continuation(task, ex, text), len(questions) - 1)
        counts["rationales_kept"] = len(rows)
        if not rows:
            raise UserError(f"--teacher_data: {teacher_data}: no usable rationale for any train question "
                            f"({counts['questions_absent_from_file']} questions absent, "
                            f"{counts['rationales_wrong_answer']} rationales with a wrong answer)")
    counts["rows"] = len(rows)
    counts["questions_trained"] = len(questions)
    result = TrainData(rows, questions, counts=counts)
    if cl_pos_path or cl_neg_path:
        if not (cl_pos_path and cl_neg_path):
            raise UserError("--contrastive needs both --cl_pos_path and --cl_neg_path")
        _add_triplet_candidates(result, task, by_question, prefixes, encoder, max_length,
                                cl_pos_path, cl_neg_path, cl_pos_num, cl_neg_num, seed, cl_neg_form, answer_filter)
    counts["continuations_tokenized_alone"] = encoder.fallbacks
    return result


def _add_triplet_candidates(data: TrainData, task: TaskSpec, by_question: dict[str, Example], prefixes: list[str],
                            encoder: PairEncoder, max_length: int, pos_path: str, neg_path: str, pos_num: int, neg_num: int,
                            seed: int, neg_form: str, answer_filter: bool) -> None:
    pos_file = _by_question(read_rationale_file(pos_path, "--cl_pos_path"))
    neg_file = _by_question(read_rationale_file(neg_path, "--cl_neg_path"))
    counts = data.counts
    prefix_len: dict[int, int] = {}  # rows of a question share the prompt (truncation may shorten some)
    for row in data.rows:
        prefix_len[row.qid] = max(prefix_len.get(row.qid, 0), len(row.prefix_ids))
    for qid, question in enumerate(data.questions):
        ex = by_question[tasks.fold(question)]
        budget = max_length - prefix_len[qid]
        good = []
        for item in pos_file.get(tasks.fold(question), []):
            text = item_text(item)
            if text is not None and (not answer_filter or is_correct(task, ex, text)):
                good.append(tasks.continuation(task, ex, text))
            else:
                counts["positives_dropped"] += 1
        good = _select(list(dict.fromkeys(good)), pos_num, seed, question)
        data.positives.append([(text, encoder.candidate(prefixes[qid], text, budget)) for text in good])
        wrong = []
        for item in neg_file.get(tasks.fold(question), []):
            text = item_text(item)
            if text is not None and text.strip() and not (answer_filter and is_correct(task, ex, text)):
                wrong.append(wrong_continuation(task, ex, text, neg_form))  # shaped after the wrong-answer check
            else:
                counts["negatives_dropped"] += 1  # malformed, empty, or actually right
        wrong = _select(list(dict.fromkeys(wrong)), neg_num, seed, question)
        data.negatives.append([encoder.candidate(prefixes[qid], text, budget) for text in wrong])
    counts["positives_kept"] = sum(map(len, data.positives))
    counts["negatives_kept"] = sum(map(len, data.negatives))
    counts["rows_with_triplet"] = sum(bool(data.positive_candidates(r)) and bool(data.negatives[r.qid])
                                      for r in data.rows)
