"""Losses of the student (SPEC §5), as small pure functions of tensors: the weighted LM loss and
the self-reflection losses that compare the teacher's rationale (anchor), another teacher
rationale (positive) and the student's own mistake (negative).

`shared_step.py` runs the model and hands each self-reflection loss a `ContrastInputs`; the
loss named by `--cl_loss` comes from `CONTRAST_LOSSES`. Adding one is a function here, an entry
in that table, and its flags (a `LossConfig` field here, a `TrainArguments` field in args.py).
A loss that needs the continuations' token log-probs says so (`needs_logprobs`): the shared step
then also returns them.

`LossConfig` is the one place where loss settings are checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from common import UserError

MLE_MODES = ("weight", "hf", "nograd", "no")
REPR_MODES = ("last", "pool")
ANCHOR_MODES = ("detached", "full")


@dataclass
class LossConfig:
    mle: str = "weight"          # weight | hf | nograd | no
    mle_w: float = 0.1           # weight of prompt tokens in mode `weight`
    contrastive: bool = False    # add the self-reflection loss
    cl_loss: str = "triplet"     # a key of CONTRAST_LOSSES
    cl_ratio: float = 0.5        # self-reflection loss multiplier
    cl_p: float = 1.0            # triplet margin
    cl_repr: str = "last"        # last | pool
    cl_anchor: str = "detached"  # detached: anchor re-read on the no-grad prefix (original) | full: from the LM forward
    cl_clip: bool = False        # zero the self-reflection loss when it is below the LM loss or 0.01 (clip_self_reflection)

    def __post_init__(self):
        choices = {"mle": MLE_MODES, "cl_repr": REPR_MODES, "cl_anchor": ANCHOR_MODES, "cl_loss": tuple(CONTRAST_LOSSES)}
        for name, allowed in choices.items():
            check_choice(name, getattr(self, name), allowed)
        if self.mle == "no" and not self.contrastive:
            raise UserError("--mle no trains only through the triplet loss: it needs --contrastive yes")
        if self.cl_clip and self.mle == "no":
            raise UserError("--cl_clip compares the self-reflection loss with the LM loss: it needs --mle weight, hf or nograd")

    @classmethod
    def from_args(cls, args) -> "LossConfig":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})

    @property
    def needs_logprobs(self) -> bool:
        return self.contrastive and CONTRAST_LOSSES[self.cl_loss].needs_logprobs


def check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------- LM loss

def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     cont_mask: torch.Tensor, mode: str = "weight", mle_w: float = 0.1) -> torch.Tensor:
    """Token cross-entropy of a causal LM on (B, T) text; logits (B, T, V) predict the next token.

    A target is "predicted" when it and the token before it are real (attention_mask).
      weight: sum of CE, prompt targets x mle_w, continuation targets x 1, / #predicted targets
      hf:     mean CE over predicted targets
      nograd: mean CE over continuation targets whose predecessor is also in the continuation
              (the first continuation token is predicted by the prompt, run without grad)
      no:     0
    `cont_mask` marks continuation tokens. CE is computed in float32 on used positions only."""
    check_choice("mle", mode, MLE_MODES)
    if mode == "no":
        return logits.new_zeros((), dtype=torch.float32)
    real, cont = attention_mask.bool(), cont_mask.bool()
    if mode == "nograd":
        used = cont[:, :-1] & cont[:, 1:]
        weights = used.float()
    else:
        used = real[:, :-1] & real[:, 1:]
        weights = used.float()
        if mode == "weight":
            weights = weights * torch.where(cont[:, 1:], 1.0, mle_w)
    ce = F.cross_entropy(logits[:, :-1][used].float(), input_ids[:, 1:][used], reduction="none")
    return (ce * weights[used]).sum() / used.sum().clamp(min=1)


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


@dataclass(frozen=True)
class ContrastLoss:
    fn: Callable[[ContrastInputs, LossConfig], torch.Tensor]  # unscaled; the step multiplies by cl_ratio
    needs_logprobs: bool = False


def triplet_term(x: ContrastInputs, cfg: LossConfig) -> torch.Tensor:
    return triplet_loss(x.anchor, x.positive, x.negative, x.row_mask, cfg.cl_p)


CONTRAST_LOSSES: dict[str, ContrastLoss] = {
    "triplet": ContrastLoss(triplet_term),
}
