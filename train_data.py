"""Training data for the student: rows from teacher rationales, triplet candidates, batches, collators.

Nothing here knows about the HF Trainer: `run_trainer.py` builds a `TrainData` with
`build_train_data`, wraps it in a `TailoredDataset`, batches it with `UniqueQuestionBatchSampler`
and collates with `TailoredCollator` (for `shared_step.compute_tailored_loss`; the literal
five-forward reference and its collator live in `tests/reference.py`).

Row = one (question, teacher rationale) pair:
    prefix       = tasks.build_prompt(task, ex, demos, rationale=True)   (the inference prompt)
    continuation = tasks.continuation(task, ex, rationale) + eos
The prefix is tokenized as generation tokenizes the prompt, the continuation as the tokenizer
splits the whole text after it (`PairEncoder`). Answer-only mode (no teacher file) uses
`tasks.continuation(task, ex, None)` with the dataset's gold.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Sequence, get_args

import torch

import tasks
from answers import ANSWER_MARKER, answer_line, cut_at_blank_line
from args import NegForm
from common import UserError, read_json
from losses import lm_target_counts
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


# ---------------------------------------------------------------- dataset

class TailoredDataset(torch.utils.data.Dataset):
    """Rows as feature dicts; each row draws one positive and one negative per epoch.

    The draw is a pure function of (seed, epoch, row index), so it is the same in every process
    and needs no shared RNG state (accelerate calls `set_epoch` on the dataset each epoch; with
    persistent dataloader workers, call it before the workers start)."""

    def __init__(self, data: TrainData, seed: int = 42):
        self.data = data
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data.rows)

    def row_questions(self) -> list[int]:
        return [row.qid for row in self.data.rows]

    def __getitem__(self, index: int) -> dict:
        row = self.data.rows[index]
        feature = {"row": index, "qid": row.qid, "prefix_ids": row.prefix_ids, "cont_ids": row.cont_ids,
                   "pos_ids": None, "neg_ids": None}
        positives = self.data.positive_candidates(row)
        negatives = self.data.negatives[row.qid] if self.data.negatives else []
        if positives and negatives:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            feature["pos_ids"] = rng.choice(positives)
            feature["neg_ids"] = rng.choice(negatives)
        return feature


# ---------------------------------------------------------------- batches

class UniqueQuestionBatchSampler(torch.utils.data.Sampler):
    """Global batches of `batch_size` row indices; a question never appears twice in a batch.

    Per epoch: questions are shuffled, each question's rows shuffled and laid out contiguously,
    and row k of that order goes to batch k mod n_batches, with
    n_batches = max(ceil(rows / batch_size), most rows of one question). A question has at most
    n_batches contiguous rows, so its rows land in distinct batches; every row appears exactly
    once per epoch. Batches left short are topped up with random rows of other questions (the
    same row may then be seen twice in that epoch); batch order is shuffled. The number of
    batches is the same every epoch, and everything is a function of (seed, epoch)."""

    def __init__(self, row_questions: Sequence[Hashable], batch_size: int, seed: int = 42):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.groups: dict[Hashable, list[int]] = {}
        for index, question in enumerate(row_questions):
            self.groups.setdefault(question, []).append(index)
        if len(self.groups) < batch_size:
            raise UserError(f"batch size {batch_size} is larger than the number of distinct training questions "
                            f"({len(self.groups)}); a batch may not hold the same question twice")
        self.row_questions = list(row_questions)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.n_batches = max(math.ceil(len(self.row_questions) / batch_size), max(map(len, self.groups.values())))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(self.groups)
        rng.shuffle(order)
        laid_out = [i for q in order for i in rng.sample(self.groups[q], len(self.groups[q]))]
        batches = [laid_out[b::self.n_batches] for b in range(self.n_batches)]
        for batch in batches:
            self._top_up(batch, order, rng)
        rng.shuffle(batches)
        return batches

    def _top_up(self, batch: list[int], questions: list[Hashable], rng: random.Random) -> None:
        taken = {self.row_questions[i] for i in batch}
        spare = [q for q in questions if q not in taken]
        for q in rng.sample(spare, self.batch_size - len(batch)):
            batch.append(rng.choice(self.groups[q]))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


# ---------------------------------------------------------------- collators

def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (len(seqs), longest); padding on the left or the right."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip padding: real tokens count 0, 1, ... (+ offset), pads get 0 + offset."""
    offset = torch.as_tensor(offset).reshape(-1, 1) if not isinstance(offset, int) else offset
    return (mask.cumsum(-1) - 1).clamp(min=0) + offset


def _triplet_parts(features: list[dict], eos_id: int) -> tuple[list[list[int]], torch.Tensor]:
    """Positive and negative ids interleaved (pos0, neg0, pos1, neg1, ...) and the per-row mask.

    Rows without a triplet get a one-token placeholder: every forward still runs on every rank
    (ZeRO-3 gathers parameters collectively), and the loss masks them out."""
    seqs, mask = [], []
    for f in features:
        has = f.get("pos_ids") is not None and f.get("neg_ids") is not None
        seqs += [f["pos_ids"], f["neg_ids"]] if has else [[eos_id], [eos_id]]
        mask.append(float(has))
    return seqs, torch.tensor(mask)


def triplet_rows(triplet_mask: list[float]) -> list[int]:
    """Rows that have a triplet; row 0 alone when none has (the contrast forward must still run on every rank)."""
    return [i for i, has in enumerate(triplet_mask) if has] or [0]


@dataclass
class TailoredCollator:
    """Batch for `shared_step.compute_tailored_loss`.

    Layout (B rows, P = longest prefix, C = longest continuation, K = longest pos/neg):
        prefix_ids, prefix_mask    (B, P)  LEFT-padded prompt: every prefix ends at column P-1
        cont_ids, cont_mask        (B, C)  RIGHT-padded continuation (teacher rationale + eos)
        position_ids               (B, P+C) positions of [prefix | continuation], pads skipped
    so `cat([prefix_ids, cont_ids], 1)` is [left pad | prefix | continuation | right pad] and the
    prefix K/V of columns < P serve every continuation of the row. With `contrastive`:
        contrast_ids, contrast_mask (2B, K) RIGHT-padded; row 2i = positive of row i, 2i+1 = its
                                    negative (the order of Cache.batch_repeat_interleave(2))
        contrast_position_ids       (2B, K) continuing after row i's real prefix length
        triplet_mask                (B,)  1.0 where row i has a distinct positive and a negative
        triplet_rows                (N,)  long: the rows with a triplet (row 0 alone when none has)
        longest_anchor, longest_pair  ints: the longest continuation, and positive or negative, of those rows
    and `lm_target_counts` (losses.lm_target_counts). The ints are sizes the step needs on the host: read
    from the device, each would stall it (`speed.bucket_batch`'s padding leaves them unchanged).
    """
    pad_token_id: int
    eos_token_id: int
    contrastive: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prefix_ids, prefix_mask = _pad([f["prefix_ids"] for f in features], self.pad_token_id, left=True)
        cont_ids, cont_mask = _pad([f["cont_ids"] for f in features], self.pad_token_id)
        batch = {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "cont_ids": cont_ids, "cont_mask": cont_mask,
                 "position_ids": positions_from_mask(torch.cat([prefix_mask, cont_mask], 1)),
                 "lm_target_counts": lm_target_counts(torch.cat([prefix_mask, cont_mask], 1),
                                                      torch.cat([torch.zeros_like(prefix_mask), cont_mask], 1))}
        if self.contrastive:
            seqs, triplet_mask = _triplet_parts(features, self.eos_token_id)
            contrast_ids, contrast_mask = _pad(seqs, self.pad_token_id)
            prefix_len = prefix_mask.sum(1).repeat_interleave(2)
            rows = triplet_rows(triplet_mask.tolist())
            batch.update(contrast_ids=contrast_ids, contrast_mask=contrast_mask, triplet_mask=triplet_mask,
                         contrast_position_ids=positions_from_mask(contrast_mask, prefix_len),
                         triplet_rows=torch.tensor(rows), longest_anchor=max(len(features[i]["cont_ids"]) for i in rows),
                         longest_pair=max(len(seqs[2 * i + k]) for i in rows for k in (0, 1)))
        return batch
