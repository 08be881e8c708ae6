"""The shared-prefix training step: runs the model for the losses in `losses.py`.

A row is a prompt (prefix) and a teacher rationale (continuation), with, for the rows that have
a triplet, a positive (another teacher rationale) and a negative (the student's mistake). The
batch comes from `train_data.TailoredCollator`, where every prefix ends at the same column P.

  mle weight|hf: ONE forward on [prefix | continuation] with grad gives the LM logits; its KV
      cache, cut to the first P columns and detached, is the prefix cache of ONE forward over
      [anchor, positive, negative] (--cl_anchor detached, the original's gradient) or over
      [positive, negative] with the anchor read from the LM forward (--cl_anchor full: the
      anchor's activations are not computed twice, and its self-reflection gradient also
      reaches the prompt's activations), run only for the rows that have a triplet.
      2 forwards instead of the original's 5.
  mle nograd|no: the prefix without grad, then ONE forward over [anchor, pos, neg] on the
      prefix cache repeated x3. 2 forwards instead of 4-5.
When the full forward returns no reusable cache (gradient checkpointing turns the cache off,
sliding-window layers), the prefix is run once more without grad: still 3 forwards. Under
gradient checkpointing the forwards that read the prefix cache run unchecked (`cache_kept`):
transformers 5 layers silently drop a passed cache when checkpointing.

Values equal the literal five-forward reference (`tests/reference.py`; tests hold them to 1e-4),
and so do gradients except with --cl_anchor full. Forwards always run on every rank, even when
no row of the batch has a triplet, because ZeRO-3 gathers parameters collectively inside each
forward. Parameters are never touched directly: everything goes through the (possibly wrapped)
model's forward, and final hidden states are read with a forward hook on the base model, so
DeepSpeed/DDP wrappers and peft's PeftModel (--lora_r) work. The cache and keyword renames of
transformers 5.x live here too.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from losses import (CONTRAST_LOSSES, ContrastInputs, LossConfig, clip_self_reflection, representation, token_logprobs,
                    weighted_lm_loss)

# ---------------------------------------------------------------- model plumbing

def _is_peft(model: torch.nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "peft" and callable(getattr(model, "get_base_model", None))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / DeepSpeedEngine / accelerate wrappers (they all keep it in .module)
    and inside a peft `PeftModel` (--lora_r > 0: the HF model with the adapters injected)."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif _is_peft(model):
            model = model.get_base_model()
        else:
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
    """(KV cache of the left-padded prefixes (of `rows`), computed without grad, each row repeated;
    the prefixes' last-position logits (N, V), which predict every continuation's first token)."""
    width = batch["prefix_ids"].shape[1]
    pick = slice(None) if rows is None else rows
    with torch.no_grad():
        out = _forward(model, batch["prefix_ids"][pick], batch["prefix_mask"][pick],
                       batch["position_ids"][pick, :width], use_cache=True, logits=False)
    cache = _output_cache(out)
    cache.batch_repeat_interleave(repeats)
    return cache, out.logits[:, -1]


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


# ---------------------------------------------------------------- the step

def _contrast_inputs(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, parts: int, cfg: LossConfig,
                     row_mask: torch.Tensor, anchor: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                     first_logits: torch.Tensor | None = None) -> ContrastInputs:
    """Rows interleaved [anchor,] positive, negative per triplet row -> ContrastInputs."""
    reps = [representation(hidden[k::parts], mask[k::parts], cfg.cl_repr) for k in range(parts)]
    inputs = ContrastInputs(*([anchor] + reps if parts == 2 else reps), row_mask=row_mask)
    if logits is not None:
        pos, neg = parts - 2, parts - 1
        inputs.positive_mask, inputs.negative_mask = mask[pos::parts], mask[neg::parts]
        inputs.positive_logprobs = token_logprobs(first_logits, logits[pos::parts], ids[pos::parts], mask[pos::parts])
        inputs.negative_logprobs = token_logprobs(first_logits, logits[neg::parts], ids[neg::parts], mask[neg::parts])
    return inputs


def compute_tailored_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Total loss (LM + cl_ratio * self-reflection) and detached metrics lm_loss, cl_loss, triplet_fraction."""
    prefix_ids, prefix_mask = batch["prefix_ids"], batch["prefix_mask"]
    cont_ids, cont_mask = batch["cont_ids"], batch["cont_mask"]
    width = prefix_ids.shape[1]
    want_logprobs = cfg.needs_logprobs
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
        anchor = representation(full["hidden"][rows, width:], cont_mask[rows], cfg.cl_repr) if parts == 2 else None
        first_logits = out.logits[rows, width - 1] if want_logprobs else None
        cache = reuse_prefix_cache(_output_cache(out), width, parts, rows)
        if cache is None:
            cache, _ = prefix_cache(model, batch, parts, rows)
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
            out = _forward(model, ids, torch.cat([prefix_mask[rows].repeat_interleave(parts, 0), mask], 1), positions,
                           cache=cache, use_cache=True, logits=want_logprobs)
        inputs = _contrast_inputs(contrast["hidden"], ids, mask, parts, cfg, batch["triplet_mask"][rows], anchor,
                                  out.logits if want_logprobs else None, first_logits)
    else:
        # nograd / no: the prefix never gets grad, so anchor, positive and negative share one forward.
        columns = max(cont_ids.shape[1], batch["contrast_ids"].shape[1])
        ids = _interleave(_pad_right(cont_ids, columns), _pad_right(batch["contrast_ids"], columns))
        mask = _interleave(_pad_right(cont_mask, columns), _pad_right(batch["contrast_mask"], columns))
        positions = _interleave(_pad_right(batch["position_ids"][:, width:], columns),
                                _pad_right(batch["contrast_position_ids"], columns))
        cache, first_logits = prefix_cache(model, batch, 3)
        with final_hidden(model) as store, cache_kept(model):
            out = _forward(model, ids, torch.cat([prefix_mask.repeat_interleave(3, 0), mask], 1), positions,
                           cache=cache, use_cache=True, logits=cfg.mle == "nograd" or want_logprobs)
        hidden = store["hidden"]
        lm = (weighted_lm_loss(out.logits[0::3], ids[0::3], mask[0::3], mask[0::3], "nograd")
              if cfg.mle == "nograd" else hidden.new_zeros((), dtype=torch.float32))
        inputs = _contrast_inputs(hidden, ids, mask, 3, cfg, batch["triplet_mask"],
                                  logits=out.logits if want_logprobs else None, first_logits=first_logits)
    cl = CONTRAST_LOSSES[cfg.cl_loss].fn(inputs, cfg) * cfg.cl_ratio
    if cfg.cl_clip:
        cl = clip_self_reflection(lm, cl)
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics
