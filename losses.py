"""Losses of the student (SPEC §5), as small pure functions of tensors: the weighted LM loss and
the self-reflection losses that compare the teacher's rationale (anchor), another teacher
rationale (positive) and the student's own mistake (negative).

`shared_step.py` runs the model and hands each self-reflection loss a `ContrastInputs`; the
loss named by `--cl_loss` comes from `CONTRAST_LOSSES`. Adding one is a function here, an entry
in that table, and its flags (a field of `args.LossArguments`, which `LossConfig` is).
A loss that needs the continuations' token log-probs says so (`needs_logprobs`): the shared step
then also returns them; one that also needs them under the frozen starting model says `needs_reference`.

`LossConfig` is the one place where loss settings are checked.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, get_args

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from args import AnchorMode, LmLossImpl, LossArguments, MleMode, ReprMode
from common import UserError

MLE_MODES = get_args(MleMode)
REPR_MODES = get_args(ReprMode)
ANCHOR_MODES = get_args(AnchorMode)
LM_LOSS_IMPLS = tuple(impl for impl in get_args(LmLossImpl) if impl != "auto")  # how the LM loss reaches the output head


@dataclass
class LossConfig(LossArguments):
    """The loss flags (declared once, in args.LossArguments) as the loss functions read them, checked."""

    def __post_init__(self):
        if self.lm_loss_impl == "auto":
            self.lm_loss_impl = "chunked" if torch.cuda.is_available() else "logits"
        choices = {"mle": MLE_MODES, "cl_repr": REPR_MODES, "cl_anchor": ANCHOR_MODES, "cl_loss": tuple(CONTRAST_LOSSES),
                   "lm_loss_impl": LM_LOSS_IMPLS}
        for name, allowed in choices.items():
            check_choice(name, getattr(self, name), allowed)
        if self.lm_loss_chunk < 1:
            raise UserError(f"--lm_loss_chunk must be at least 1, got {self.lm_loss_chunk}")
        if self.mle == "no" and not self.contrastive:
            raise UserError("--mle no trains only through the triplet loss: it needs --contrastive yes")
        if self.cl_clip and self.mle == "no":
            raise UserError("--cl_clip compares the self-reflection loss with the LM loss: it needs --mle weight, hf or nograd")

    @classmethod
    def from_args(cls, args) -> "LossConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def needs_logprobs(self) -> bool:
        return self.contrastive and CONTRAST_LOSSES[self.cl_loss].needs_logprobs

    @property
    def needs_reference(self) -> bool:
        return self.contrastive and CONTRAST_LOSSES[self.cl_loss].needs_reference


def check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------- LM loss

def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     cont_mask: torch.Tensor, mode: str = "weight", mle_w: float = 0.1,
                     counts: dict[str, int] | None = None) -> torch.Tensor:
    """Token cross-entropy of a causal LM on (B, T) text; logits (B, T, V) predict the next token.

    A target is "predicted" when it and the token before it are real (attention_mask).
      weight: sum of CE, prompt targets x mle_w, continuation targets x 1, / #predicted targets
      hf:     mean CE over predicted targets
      nograd: mean CE over continuation targets whose predecessor is also in the continuation
              (the first continuation token is predicted by the prompt, run without grad)
      no:     0
    `cont_mask` marks continuation tokens. CE is computed in float32 on used positions only. `counts`:
    `lm_target_counts` of the same masks, when known on the host (see `target_positions`)."""
    check_choice("mle", mode, MLE_MODES)
    if mode == "no":
        return logits.new_zeros((), dtype=torch.float32)
    used, weights = lm_targets(attention_mask, cont_mask, mode, mle_w)
    rows, cols = target_positions(used, None if counts is None else counts[mode])
    ce = F.cross_entropy(logits[rows, cols].float(), input_ids[rows, cols + 1], reduction="none")
    return (ce * weights[rows, cols]).sum() / used.sum().clamp(min=1)


def lm_targets(attention_mask: torch.Tensor, cont_mask: torch.Tensor, mode: str,
               mle_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(used, weights), both (B, T-1): which next-token targets `weighted_lm_loss` counts, and their weights."""
    real, cont = attention_mask.bool(), cont_mask.bool()
    if mode == "nograd":
        used = cont[:, :-1] & cont[:, 1:]
        weights = used.float()
    else:
        used = real[:, :-1] & real[:, 1:]
        weights = used.float()
        if mode == "weight":
            weights = weights * torch.where(cont[:, 1:], 1.0, mle_w)
    return used, weights


def lm_target_counts(attention_mask: torch.Tensor, cont_mask: torch.Tensor) -> dict[str, int]:
    """How many targets `weighted_lm_loss` counts in each mode (and, as "continuation", how many of weight's
    are continuation tokens: liger sums the two weight classes apart), from (B, T) masks on the host: the
    collator's, so the step never asks the device (the counts do not change with padding)."""
    used = {mode: lm_targets(attention_mask, cont_mask, mode, 1.0)[0] for mode in ("weight", "hf", "nograd")}
    counts = {mode: int(mask.sum()) for mode, mask in used.items()}
    counts["continuation"] = int((used["weight"] & cont_mask.bool()[:, 1:]).sum())
    return counts


def target_positions(used: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the True entries of `used`, in row-major order (that of boolean-mask indexing).
    With their `count` known on the host the output size is too, so the device is not waited on
    (nonzero and boolean-mask indexing must learn it first); without, it is."""
    found = used.nonzero() if count is None else torch.nonzero_static(used, size=count)
    return found.unbind(1)


def _chunk_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


def chunked_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, cont_mask: torch.Tensor, mode: str = "weight", mle_w: float = 0.1,
                    chunk: int = 4096, n_chunks: Callable[[int], int] | None = None,
                    counts: dict[str, int] | None = None) -> torch.Tensor:
    """`weighted_lm_loss` from the final hidden states (B, T, d) and the output head (hidden -> logits),
    never holding more than `chunk` positions' logits: each chunk of targets is checkpointed, so backward
    recomputes its logits rather than keeping (B, T, V) of them (bf16 logits, their fp32 copy and the
    log-softmax were ~10 bytes per vocabulary entry per position). `head` is called as a module, once
    per chunk and again in backward, so ZeRO-3's hooks gather a partitioned head each time; under ZeRO-3
    `n_chunks` maps this rank's chunk count to the largest over ranks (empty chunks fill up), because
    every gather is a collective. `counts`: as in `weighted_lm_loss`."""
    check_choice("mle", mode, MLE_MODES)
    if mode == "no":
        return hidden.new_zeros((), dtype=torch.float32)
    used, weights = lm_targets(attention_mask, cont_mask, mode, mle_w)
    rows, cols = target_positions(used, None if counts is None else counts[mode])
    picked, targets, weights = hidden[rows, cols], input_ids[rows, cols + 1], weights[rows, cols]
    count = -(-picked.shape[0] // chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, chunk * (n_chunks(count) if n_chunks else count), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_ce, head, picked[part], targets[part], weights[part], use_reentrant=False)
    return total / used.sum().clamp(min=1)


def liger_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, cont_mask: torch.Tensor, mode: str = "weight",
                  mle_w: float = 0.1, counts: dict[str, int] | None = None) -> torch.Tensor:
    """`weighted_lm_loss` through liger-kernel's fused linear cross-entropy (no logits in memory at all).
    It needs the head's weight itself (not under ZeRO-3). Summed per weight class (prompt targets x mle_w,
    continuation targets x 1), which every liger version supports. `counts`: as in `weighted_lm_loss`."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    check_choice("mle", mode, MLE_MODES)
    if mode == "no":
        return hidden.new_zeros((), dtype=torch.float32)
    used, _ = lm_targets(attention_mask, cont_mask, mode, mle_w)
    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    if mode != "weight":
        classes = [(used, None if counts is None else counts[mode], 1.0)]
    else:
        cont = cont_mask.bool()[:, 1:]
        classes = [(used & cont, None if counts is None else counts["continuation"], 1.0),
                   (used & ~cont, None if counts is None else counts["weight"] - counts["continuation"], mle_w)]
    total = hidden.new_zeros((), dtype=torch.float32)
    for targets, count, scale in classes:
        rows, cols = target_positions(targets, count)
        if rows.numel():
            total = total + scale * fused(weight, hidden[rows, cols], input_ids[rows, cols + 1], bias).float()
    return total / used.sum().clamp(min=1)


def token_logprobs(first_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """(N, K) log-probability of each continuation token, 0 at padding.

    `first_logits` (N, V): the prompt's last position, which predicts token 0; `logits` (N, K, V):
    the continuation's own positions, position j predicting token j + 1. Computed in float32."""
    predictors = torch.cat([first_logits.unsqueeze(1), logits[:, :-1]], 1).float()
    picked = torch.log_softmax(predictors, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked * mask.to(picked.dtype)


# ---------------------------------------------------------------- self-reflection

def representation(hidden: torch.Tensor, mask: torch.Tensor, how: str = "last") -> torch.Tensor:
    """(N, d) representation of right-padded sequences: hidden state of the last real token, or the mean."""
    check_choice("cl_repr", how, REPR_MODES)
    if how == "last":
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    weights = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, row_mask: torch.Tensor,
                 margin: float = 1.0) -> torch.Tensor:
    """Masked mean over rows of max(0, cos(a, n) - cos(a, p) + margin); 0 when no row counts.

    (The original's TripletMarginWithDistanceLoss with distance 1 - cos; not multiplied by cl_ratio.)"""
    cos_p = F.cosine_similarity(anchor.float(), positive.float(), dim=-1)
    cos_n = F.cosine_similarity(anchor.float(), negative.float(), dim=-1)
    per_row = torch.nan_to_num(torch.relu(cos_n - cos_p + margin))
    row_mask = row_mask.to(per_row)
    return (per_row * row_mask).sum() / row_mask.sum().clamp(min=1)


def clip_self_reflection(lm: torch.Tensor, cl: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """--cl_clip (the original's): the self-reflection loss (already x cl_ratio) counts only while it
    is at least the LM loss and at least `floor`; otherwise it is zeroed, gradient included."""
    drop = (lm.detach() > cl.detach()) | (cl.detach() < floor)
    return torch.where(drop, torch.zeros_like(cl), cl)


@dataclass
class ContrastInputs:
    """What the shared step gives a self-reflection loss, for the rows that have a triplet (N of them)."""
    anchor: torch.Tensor                      # (N, d) representations (--cl_repr)
    positive: torch.Tensor                    # (N, d)
    negative: torch.Tensor                    # (N, d)
    row_mask: torch.Tensor                    # (N,) 1.0 where the row really has a triplet
    positive_logprobs: torch.Tensor | None = None  # (N, K) token log-probs (token_logprobs), if needed
    negative_logprobs: torch.Tensor | None = None
    positive_mask: torch.Tensor | None = None      # (N, K) real continuation tokens
    negative_mask: torch.Tensor | None = None
    reference_positive_logprobs: torch.Tensor | None = None  # (N, K) the same, under the frozen reference model
    reference_negative_logprobs: torch.Tensor | None = None


@dataclass(frozen=True)
class ContrastLoss:
    fn: Callable[[ContrastInputs, LossConfig], torch.Tensor]  # unscaled; the step multiplies by cl_ratio
    needs_logprobs: bool = False
    needs_reference: bool = False  # also the reference model's token log-probs (implies needs_logprobs)


def triplet_term(x: ContrastInputs, cfg: LossConfig) -> torch.Tensor:
    return triplet_loss(x.anchor, x.positive, x.negative, x.row_mask, cfg.cl_p)


# ---------------------------------------------------------------- preference losses
# The teacher's rationale is the chosen answer, the student's mistake the rejected one. SimPO and ORPO
# need no reference model; DPO reads a frozen copy of the run's starting weights (needs_reference).

def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor, average: bool = True) -> torch.Tensor:
    """(N,) log-probability of each continuation from its (N, K) token log-probs: the sum over real
    tokens, or their mean (length-normalised, so a long rationale is not rejected for its length)."""
    mask = mask.to(logprobs.dtype)
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def masked_row_mean(per_row: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the rows that have a pair; 0 when none has (rows without one may hold anything)."""
    row_mask = row_mask.to(per_row)
    return (torch.nan_to_num(per_row) * row_mask).sum() / row_mask.sum().clamp(min=1)


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, row_mask: torch.Tensor, beta: float = 2.0,
               gamma: float = 1.0) -> torch.Tensor:
    """SimPO (Meng et al., 2024): masked mean of -log sigmoid(beta * (chosen - rejected) - gamma), on
    length-normalised log-probs. Zero gradient only once chosen leads rejected by well over gamma / beta."""
    return masked_row_mean(F.softplus(gamma - beta * (chosen - rejected)), row_mask)


def log_odds(avg_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(avg_logprob); capped just below p = 1, where the odds are infinite."""
    lp = avg_logprob.clamp(max=-1e-6)
    return lp - torch.log(-torch.expm1(lp))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al., 2024): masked mean of -log sigmoid(log odds(chosen) -
    log odds(rejected)), on length-normalised log-probs; ORPO's lambda is --cl_ratio."""
    return masked_row_mean(F.softplus(log_odds(rejected) - log_odds(chosen)), row_mask)


def _pair_logprobs(x: ContrastInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return (sequence_logprob(x.positive_logprobs, x.positive_mask),
            sequence_logprob(x.negative_logprobs, x.negative_mask))


def simpo_term(x: ContrastInputs, cfg: LossConfig) -> torch.Tensor:
    return simpo_loss(*_pair_logprobs(x), x.row_mask, cfg.cl_beta, cfg.cl_gamma)


def orpo_term(x: ContrastInputs, cfg: LossConfig) -> torch.Tensor:
    return orpo_loss(*_pair_logprobs(x), x.row_mask)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             row_mask: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): masked mean of -log sigmoid(beta * ((chosen - ref_chosen) - (rejected -
    ref_rejected))), on summed log-probs; log 2 while the policy is the reference."""
    return masked_row_mean(F.softplus(-beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), row_mask)


def dpo_term(x: ContrastInputs, cfg: LossConfig) -> torch.Tensor:
    summed = [sequence_logprob(lp, mask, average=False) for lp, mask in
              ((x.positive_logprobs, x.positive_mask), (x.negative_logprobs, x.negative_mask),
               (x.reference_positive_logprobs, x.positive_mask), (x.reference_negative_logprobs, x.negative_mask))]
    return dpo_loss(*summed, x.row_mask, cfg.cl_beta)


CONTRAST_LOSSES: dict[str, ContrastLoss] = {
    "triplet": ContrastLoss(triplet_term),
    "simpo": ContrastLoss(simpo_term, needs_logprobs=True),
    "orpo": ContrastLoss(orpo_term, needs_logprobs=True),
    "dpo": ContrastLoss(dpo_term, needs_logprobs=True, needs_reference=True),
}
