"""Losses of the student (SPEC §5): weighted LM loss + self-reflection triplet loss.

Small pure functions (`weighted_lm_loss`, `representation`, `triplet_loss`) and two ways to
run a training step's forwards on a batch:

* `five_pass_loss` — the original's semantics, literally: (1) full text with grad for the LM
  loss; (2) prefix without grad, its KV cache reused by (3) anchor, (4) positive and
  (5) negative continuations, each its own forward. Batch from `train_data.FivePassCollator`.
* `compute_tailored_loss` — the same losses with the forwards shared (batch from
  `train_data.TailoredCollator`, where every prefix ends at the same column P):
    mle weight|hf: ONE forward on [prefix | continuation] with grad gives the LM logits; its KV
        cache, cut to the first P columns and detached, is the prefix cache of ONE forward over
        [anchor, positive, negative] (--cl_anchor detached, the original's gradient) or over
        [positive, negative] with the anchor read from the LM forward (--cl_anchor full: the
        anchor's activations are not computed twice, and its triplet gradient also reaches
        the prompt's activations), run only for the rows that have a triplet. 2 forwards instead of 5.
    mle nograd|no: the prefix without grad, then ONE forward over [anchor, pos, neg] on the
        prefix cache repeated x3. 2 forwards instead of 4-5.
  When the full forward returns no reusable cache (gradient checkpointing turns the cache off,
  sliding-window layers), the prefix is run once more without grad — still 3 forwards. Under
  gradient checkpointing the forwards that read the prefix cache run unchecked (`cache_kept`):
  transformers 5 layers silently drop a passed cache when checkpointing.

Values are identical to `five_pass_loss` (tests hold them to 1e-4), and so are the gradients
except with --cl_anchor full, whose anchor gradient also reaches the prefix (positive and
negative always see a detached prefix; the LM gradient is unchanged either way).

Notes: `triplet_loss` returns the unscaled masked mean; `compute_tailored_loss` multiplies it by
`cl_ratio`. Forwards always run on every rank, even when no row of the batch has a triplet,
because ZeRO-3 gathers parameters collectively inside each forward. We never touch
parameters directly: everything goes through the (possibly wrapped) model's forward, and final
hidden states are read with a forward hook on the base model, so DeepSpeed/DDP wrappers work.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from common import UserError
from train_data import positions_from_mask

MLE_MODES = ("weight", "hf", "nograd", "no")
REPR_MODES = ("last", "pool")
ANCHOR_MODES = ("detached", "full")


@dataclass
class LossConfig:
    mle: str = "weight"          # weight | hf | nograd | no
    mle_w: float = 0.1           # weight of prompt tokens in mode `weight`
    contrastive: bool = False    # add the triplet loss
    cl_ratio: float = 0.5        # triplet loss multiplier
    cl_p: float = 1.0            # triplet margin
    cl_repr: str = "last"        # last | pool
    cl_anchor: str = "detached"  # detached: anchor re-read on the no-grad prefix (original) | full: from the LM forward

    def __post_init__(self):
        check_mle_mode(self.mle)
        if self.cl_anchor not in ANCHOR_MODES:
            raise UserError(f"--cl_anchor must be one of {', '.join(ANCHOR_MODES)}, got {self.cl_anchor!r}")
        if self.cl_repr not in REPR_MODES:
            raise UserError(f"--cl_repr must be one of {', '.join(REPR_MODES)}, got {self.cl_repr!r}")
        if self.mle == "no" and not self.contrastive:
            raise UserError("--mle no trains only through the triplet loss: it needs --contrastive yes")

    @classmethod
    def from_args(cls, args) -> "LossConfig":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})


def check_mle_mode(mode: str) -> None:
    if mode not in MLE_MODES:
        raise UserError(f"--mle must be one of {', '.join(MLE_MODES)}, got {mode!r}")


# ---------------------------------------------------------------- pure functions

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
    check_mle_mode(mode)
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


def representation(hidden: torch.Tensor, mask: torch.Tensor, how: str = "last") -> torch.Tensor:
    """(N, d) representation of right-padded sequences: hidden state of the last real token, or the mean."""
    if how == "last":
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    if how == "pool":
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise UserError(f"--cl_repr must be one of {', '.join(REPR_MODES)}, got {how!r}")


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, row_mask: torch.Tensor,
                 margin: float = 1.0) -> torch.Tensor:
    """Masked mean over rows of max(0, cos(a, n) - cos(a, p) + margin); 0 when no row counts.

    (The original's TripletMarginWithDistanceLoss with distance 1 - cos; not multiplied by cl_ratio.)"""
    cos_p = F.cosine_similarity(anchor.float(), positive.float(), dim=-1)
    cos_n = F.cosine_similarity(anchor.float(), negative.float(), dim=-1)
    per_row = torch.nan_to_num(torch.relu(cos_n - cos_p + margin))
    row_mask = row_mask.to(per_row)
    return (per_row * row_mask).sum() / row_mask.sum().clamp(min=1)


# ---------------------------------------------------------------- model plumbing

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / DeepSpeedEngine / accelerate wrappers (they all keep it in .module)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(unwrap(model).forward).parameters)


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache=None, use_cache: bool = False, logits: bool = True):
    """One causal-LM forward; `logits=False` asks for the last position's logits only (cheap head)."""
    params = _forward_params(model)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache  # transformers >= 5.2x renamed it
    if not logits and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


def _output_cache(output):
    cache = getattr(output, "cache", None)  # transformers >= 5.2x; `past_key_values` before
    return cache if cache is not None else getattr(output, "past_key_values", None)


@contextmanager
def final_hidden(model: torch.nn.Module) -> Iterator[dict]:
    """Capture the base model's last hidden state (after the final norm) of the next forward.

    Cheaper than output_hidden_states (which keeps every layer's output referenced)."""
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        store["hidden"] = output[0]

    handle = unwrap(model).base_model.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _checkpointing(model: torch.nn.Module) -> bool:
    inner = unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # renamed in transformers 5.2x
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return False


@contextmanager
def cache_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run a forward that reads a KV cache without gradient checkpointing.

    Under checkpointing, transformers 5 layers silently DROP a passed cache (the replay would update it
    twice), so a continuation would lose its prefix. The forwards that read the prefix cache therefore run
    unchecked (their activations are kept: more memory, same values); everything else stays checkpointed."""
    flagged = [m for m in unwrap(model).modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


def reuse_prefix_cache(cache, width: int, repeats: int, rows: torch.Tensor):
    """The full forward's cache for `rows`, cut to its first `width` columns, detached, each row repeated.

    None when the cache cannot be cut that way (absent, sliding-window or other special layers)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return None
    for layer in layers:
        # Detached: the triplet loss must not push gradients into the prefix through pos/neg (as in the
        # original, whose prefix ran without grad). Indexing copies, freeing the full-width cache.
        layer.keys = layer.keys[rows, :, :width].detach()
        layer.values = layer.values[rows, :, :width].detach()
    cache.batch_repeat_interleave(repeats)
    return cache


def prefix_cache(model: torch.nn.Module, batch: dict, repeats: int, rows: torch.Tensor | None = None):
    """KV cache of the left-padded prefixes (of `rows`), computed without grad, each row repeated."""
    width = batch["prefix_ids"].shape[1]
    pick = slice(None) if rows is None else rows
    with torch.no_grad():
        out = _forward(model, batch["prefix_ids"][pick], batch["prefix_mask"][pick],
                       batch["position_ids"][pick, :width], use_cache=True, logits=False)
    cache = _output_cache(out)
    cache.batch_repeat_interleave(repeats)
    return cache


def triplet_rows(triplet_mask: torch.Tensor) -> torch.Tensor:
    """Rows that have a triplet; row 0 alone when none has (the forward must still run on every rank)."""
    rows = triplet_mask.nonzero().flatten()
    return rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=triplet_mask.device)


def _pad_right(t: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def _interleave(*parts: torch.Tensor) -> torch.Tensor:
    """Rows of k tensors of shape (B*n_i, W) -> per original row i: parts[0][i], parts[1][...], ... ."""
    b = parts[0].shape[0]
    return torch.cat([p.reshape(b, -1, p.shape[1]) for p in parts], 1).reshape(-1, parts[0].shape[1])


# ---------------------------------------------------------------- the shared-prefix step

def compute_tailored_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Total loss (LM + cl_ratio * triplet) and detached metrics lm_loss, cl_loss, triplet_fraction."""
    prefix_ids, prefix_mask = batch["prefix_ids"], batch["prefix_mask"]
    cont_ids, cont_mask = batch["cont_ids"], batch["cont_mask"]
    width = prefix_ids.shape[1]
    if cfg.mle in ("weight", "hf"):
        ids, mask = torch.cat([prefix_ids, cont_ids], 1), torch.cat([prefix_mask, cont_mask], 1)
        with final_hidden(model) as full:
            # Under checkpointing the layers would turn the cache off anyway (with a warning): fall back below.
            reuse = cfg.contrastive and not _checkpointing(model)
            out = _forward(model, ids, mask, batch["position_ids"], use_cache=reuse)
        lm = weighted_lm_loss(out.logits, ids, mask, torch.cat([torch.zeros_like(prefix_mask), cont_mask], 1),
                              cfg.mle, cfg.mle_w)
        if not cfg.contrastive:
            return lm, {"lm_loss": lm.detach()}
        # Positives and negatives only for rows that have a triplet (rows without one are masked out anyway).
        rows = triplet_rows(batch["triplet_mask"])
        pairs = torch.stack([2 * rows, 2 * rows + 1], 1).flatten()
        parts = 3 if cfg.cl_anchor == "detached" else 2  # detached: the anchor is re-read on the prefix cache too
        if parts == 2:
            anchor = representation(full["hidden"][rows, width:], cont_mask[rows], cfg.cl_repr)
        cache = reuse_prefix_cache(_output_cache(out), width, parts, rows)
        if cache is None:
            cache = prefix_cache(model, batch, parts, rows)
        del out, full
        ids, mask, positions = (batch[key][pairs] for key in ("contrast_ids", "contrast_mask", "contrast_position_ids"))
        if parts == 3:
            columns = max(cont_ids.shape[1], ids.shape[1])
            ids = _interleave(_pad_right(cont_ids[rows], columns), _pad_right(ids, columns))
            mask = _interleave(_pad_right(cont_mask[rows], columns), _pad_right(mask, columns))
            positions = _interleave(_pad_right(batch["position_ids"][rows, width:], columns),
                                    _pad_right(positions, columns))
        columns = int(mask.sum(1).max())  # right-padded: drop columns only dropped rows used
        ids, mask, positions = ids[:, :columns], mask[:, :columns], positions[:, :columns]
        with final_hidden(model) as contrast, cache_kept(model):
            _forward(model, ids, torch.cat([prefix_mask[rows].repeat_interleave(parts, 0), mask], 1), positions,
                     cache=cache, use_cache=True, logits=False)
        hidden = contrast["hidden"]
        if parts == 3:
            anchor = representation(hidden[0::3], mask[0::3], cfg.cl_repr)
        positive = representation(hidden[parts - 2::parts], mask[parts - 2::parts], cfg.cl_repr)
        negative = representation(hidden[parts - 1::parts], mask[parts - 1::parts], cfg.cl_repr)
        row_mask = batch["triplet_mask"][rows]
    else:
        # nograd / no: the prefix never gets grad, so anchor, positive and negative share one forward.
        columns = max(cont_ids.shape[1], batch["contrast_ids"].shape[1])
        ids = _interleave(_pad_right(cont_ids, columns), _pad_right(batch["contrast_ids"], columns))
        mask = _interleave(_pad_right(cont_mask, columns), _pad_right(batch["contrast_mask"], columns))
        positions = _interleave(_pad_right(batch["position_ids"][:, width:], columns),
                                _pad_right(batch["contrast_position_ids"], columns))
        cache = prefix_cache(model, batch, 3)
        with final_hidden(model) as store, cache_kept(model):
            out = _forward(model, ids, torch.cat([prefix_mask.repeat_interleave(3, 0), mask], 1), positions,
                           cache=cache, use_cache=True, logits=cfg.mle == "nograd")
        hidden = store["hidden"]
        lm = (weighted_lm_loss(out.logits[0::3], ids[0::3], mask[0::3], mask[0::3], "nograd")
              if cfg.mle == "nograd" else hidden.new_zeros((), dtype=torch.float32))
        anchor, positive, negative = (representation(hidden[k::3], mask[k::3], cfg.cl_repr) for k in range(3))
        row_mask = batch["triplet_mask"]
    cl = triplet_loss(anchor, positive, negative, row_mask, cfg.cl_p) * cfg.cl_ratio
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics


# ---------------------------------------------------------------- the literal five-forward reference

def five_pass_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The original step, one forward per piece; batch from `train_data.FivePassCollator`."""
    lm = torch.zeros((), dtype=torch.float32, device=batch["full_ids"].device)
    if cfg.mle in ("weight", "hf"):
        out = model(input_ids=batch["full_ids"], attention_mask=batch["full_mask"])  # right-padded: default positions
        lm = weighted_lm_loss(out.logits, batch["full_ids"], batch["full_mask"], batch["full_cont_mask"],
                              cfg.mle, cfg.mle_w)
        del out
    if not cfg.contrastive:
        return lm, {"lm_loss": lm.detach()}
    prefix_mask = batch["prefix_mask"]
    with torch.no_grad():
        prefix = _forward(model, batch["prefix_ids"], prefix_mask, positions_from_mask(prefix_mask), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in _output_cache(prefix).layers]
    prefix_len = prefix_mask.sum(1)

    def on_prefix(ids: torch.Tensor, mask: torch.Tensor):
        cache = DynamicCache(ddp_cache_data=kv)  # a fresh copy: a forward extends its cache in place
        kwargs = {"cache" if "cache" in _forward_params(model) else "past_key_values": cache}
        with cache_kept(model):
                return model(input_ids=ids, attention_mask=torch.cat([prefix_mask, mask], 1),
                         position_ids=positions_from_mask(mask, prefix_len), use_cache=True,
                         output_hidden_states=True, **kwargs)

    reprs = []
    for name in ("anchor", "pos", "neg"):
        out = on_prefix(batch[f"{name}_ids"], batch[f"{name}_mask"])
        if name == "anchor" and cfg.mle == "nograd":
            lm = weighted_lm_loss(out.logits, batch["anchor_ids"], batch["anchor_mask"], batch["anchor_mask"], "nograd")
        reprs.append(representation(out.hidden_states[-1], batch[f"{name}_mask"], cfg.cl_repr))
        del out
    cl = triplet_loss(*reprs, batch["triplet_mask"], cfg.cl_p) * cfg.cl_ratio
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics
