"""A `TrainData` (train_data.py) as the Trainer reads it: a dataset whose rows draw one positive and one
negative per epoch, batches in which no question appears twice, and the collator that lays a batch out for
`shared_step.compute_tailored_loss` (the literal five-forward reference and its collator live in
`tests/reference.py`)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

import torch

from common import UserError
from losses import lm_target_counts
from train_data import TrainData


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

def check_batch_fits(batch_size: int, questions: int, flag: str = "") -> None:
    """A batch holds distinct questions, so it can hold no more than there are."""
    if batch_size > questions:
        raise UserError(f"{flag or 'batch size'} {batch_size} is larger than the number of distinct training questions "
                        f"({questions}); a batch may not hold the same question twice")


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
        check_batch_fits(batch_size, len(self.groups))
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
