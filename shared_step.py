"""The shared-prefix training step: runs the model for the losses in `losses.py`.

A row is a prompt (prefix) and a teacher rationale (continuation), with, for the rows that have
a triplet, a positive (another teacher rationale) and a negative (the student's mistake). The
batch comes from `train_batches.TailoredCollator`, where every prefix ends at the same column P.

  mle weight|hf: ONE forward on [prefix | continuation] with grad gives the LM logits; its KV
      cache, cut to the first P columns and detached, is the prefix cache of ONE forward over
      [anchor, positive, negative] (--cl_anchor detached, the original's gradient) or over
      [positive, negative] with the anchor read from the LM forward (--cl_anchor full: the
      anchor's activations are not computed twice, and its self-reflection gradient also
      reaches the prompt's activations), run only for the rows that have a triplet.
      2 forwards instead of the original's 5.
  mle nograd|no: the prefix without grad, then ONE forward over [anchor, pos, neg] on the
      prefix cache repeated x3. 2 forwards instead of 4-5.
The LM forward records the prefix columns of the triplet rows in a cache of its own, which the
contrast forward then reads (`step_cache.py`, checkpointable; when it cannot be, the prefix is run
once more without grad: 3 forwards).

The LM loss either reads the model's logits (`--lm_loss_impl logits`) or, from the final hidden
states, calls the output head chunk by chunk (`chunked`, losses.chunked_lm_loss) or liger's fused
linear cross-entropy (`liger`): the forward then computes the last position's logits only. That
needs logits = head(final hidden state), checked once per model (`output_head`); otherwise logits.

Values equal the literal five-forward reference (`tests/reference.py`; tests hold them to 1e-4),
and so do gradients except with --cl_anchor full. Forwards always run on every rank, even when
no row of the batch has a triplet, because ZeRO-3 gathers parameters collectively inside each
forward. Parameters are never touched directly: everything goes through the (possibly wrapped)
model's forward (the output head's too: it is called as a module), and final hidden states are
read with a forward hook on the base model, so DeepSpeed/DDP wrappers and peft's PeftModel
(--lora_r) work; only `liger` reads the head's weight itself, and is refused under ZeRO-3. The
transformers renames (cache keyword, checkpointing switches) are shimmed in `hf_internals.py`.
"""
from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

import distributed
from hf_internals import forward_params, lm_forward, unwrap
from losses import (CONTRAST_LOSSES, ContrastInputs, LossConfig, chunked_lm_loss, clip_self_reflection, liger_lm_loss,
                    representation, token_logprobs, weighted_lm_loss)
from step_cache import prefix_cache, recording_cache, reuse_prefix_cache, serving

# ---------------------------------------------------------------- model plumbing

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


def _pad_right(t: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def _interleave(*parts: torch.Tensor) -> torch.Tensor:
    """Rows of k tensors of shape (B*n_i, W) -> per original row i: parts[0][i], parts[1][...], ... ."""
    b = parts[0].shape[0]
    return torch.cat([p.reshape(b, -1, p.shape[1]) for p in parts], 1).reshape(-1, parts[0].shape[1])


# ---------------------------------------------------------------- the output head (--lm_loss_impl)

# Config fields of architectures whose logits are not head(final hidden state): softcapping (Gemma 2/3),
# logit scales (Cohere, Granite), muP-style multipliers (Falcon-H1, MiniCPM).
_LOGIT_CHANGING = re.compile(r"final_logit_softcap|logit_scal|logits_scal|lm_head_mult|output_mult|dim_model_base")
_HEADS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _note(message: str) -> None:
    if distributed.is_main():
        print(f"note: {message}")


def _partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())  # a ZeRO-3 parameter


def output_head(model: torch.nn.Module, cfg: LossConfig, batch: dict) -> tuple[str, torch.nn.Module | None]:
    """(the LM loss path actually taken, the output head module or None for `logits`), decided once per model.

    The chunked and fused paths need logits = head(final hidden state): the model must take logits_to_keep,
    have no logit-changing config field, and pass a check on a few positions of this batch (a forward
    without grad, on every rank alike); otherwise the loss reads the model's logits, with a note."""
    if cfg.lm_loss_impl == "logits":
        return "logits", None
    inner = unwrap(model)
    key = (cfg.lm_loss_impl,)
    if key in _HEADS.get(inner, {}):
        return _HEADS[inner][key]
    impl, head, why = cfg.lm_loss_impl, inner.get_output_embeddings(), None
    changing = [k for k, v in inner.config.to_dict().items() if _LOGIT_CHANGING.search(k) and v not in (None, False)]
    if not isinstance(head, torch.nn.Module):
        why = "the model has no output head module"
    elif "logits_to_keep" not in forward_params(model):
        why = f"{type(inner).__name__}.forward takes no logits_to_keep"
    elif changing:
        why = f"its logits are not the head's output ({', '.join(changing)})"
    else:
        ids, mask = batch["cont_ids"][:1, :8], torch.ones_like(batch["cont_mask"][:1, :8])
        with torch.no_grad(), final_hidden(model) as store:
            logits = lm_forward(model, ids, mask, torch.arange(ids.shape[1], device=ids.device)[None]).logits
            mine = head(store["hidden"])
        scale = logits.float().abs().max().clamp(min=1e-6)
        if mine.shape != logits.shape or (mine.float() - logits.float()).abs().max() > 1e-2 * scale:
            why = "its logits differ from the head applied to the final hidden state"
    if why:
        _note(f"--lm_loss_impl {impl}: {why}; the LM loss reads the model's full logits")
        impl, head = "logits", None
    elif impl == "liger" and (not isinstance(head, torch.nn.Linear) or _partitioned(head)):
        _note("--lm_loss_impl liger needs the output head's weight itself (a plain Linear, not partitioned by "
              "ZeRO-3); using chunked")
        impl = "chunked"
    _HEADS.setdefault(inner, {})[key] = (impl, head)
    return impl, head


def _chunks_everywhere(head: torch.nn.Module, device: torch.device) -> Callable[[int], int] | None:
    """Under ZeRO-3 with several ranks, the largest chunk count of any rank: each head call gathers its
    parameters collectively, so every rank must make as many."""
    dist = torch.distributed
    if not (_partitioned(head) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def most(count: int) -> int:
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    return most


def lm_loss(impl: str, head, logits, hidden, ids, mask, cont_mask, mode: str, cfg: LossConfig,
            counts: dict[str, int]) -> torch.Tensor:
    """`weighted_lm_loss` by the path `output_head` chose: from the logits, or from the hidden states.
    `counts`: the batch's `lm_target_counts`, so the targets are picked without a device sync."""
    if impl == "logits":
        return weighted_lm_loss(logits, ids, mask, cont_mask, mode, cfg.mle_w, counts)
    if impl == "liger":
        return liger_lm_loss(hidden, head.weight, head.bias, ids, mask, cont_mask, mode, cfg.mle_w, counts)
    return chunked_lm_loss(hidden, head, ids, mask, cont_mask, mode, cfg.mle_w, cfg.lm_loss_chunk,
                           _chunks_everywhere(head, hidden.device), counts)


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


def reference_logprobs(reference: torch.nn.Module, batch: dict, rows: torch.Tensor | None,
                       columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) token log-probs, (N, columns), of `rows` (None: every row) under the frozen reference
    model: one forward without grad over [prefix | positive] and [prefix | negative], no cache."""
    prefix_ids, width = batch["prefix_ids"], batch["prefix_ids"].shape[1]
    rows = torch.arange(prefix_ids.shape[0], device=prefix_ids.device) if rows is None else rows
    pairs = torch.stack([2 * rows, 2 * rows + 1], 1).flatten()
    ids, mask = batch["contrast_ids"][pairs], batch["contrast_mask"][pairs]
    prefix = [t[rows, :width].repeat_interleave(2, 0) for t in (prefix_ids, batch["prefix_mask"], batch["position_ids"])]
    with torch.no_grad():
        logits = lm_forward(reference, torch.cat([prefix[0], ids], 1), torch.cat([prefix[1], mask], 1),
                            torch.cat([prefix[2], batch["contrast_position_ids"][pairs]], 1)).logits
        logprobs = _pad_right(token_logprobs(logits[:, width - 1], logits[:, width:], ids, mask)[:, :columns], columns)
    return logprobs[0::2], logprobs[1::2]


def compute_tailored_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig,
                          reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Total loss (LM + cl_ratio * self-reflection) and detached metrics lm_loss, cl_loss, triplet_fraction.
    `reference`: the frozen starting model, for a loss that `needs_reference` (--cl_loss dpo).

    Every size that depends on the data (rows with a triplet, the contrast forward's width, how many LM
    targets count) comes from the collator, known on the host: the step never waits for the device to learn
    one (no nonzero, boolean-mask indexing or .item())."""
    prefix_ids, prefix_mask = batch["prefix_ids"], batch["prefix_mask"]
    cont_ids, cont_mask = batch["cont_ids"], batch["cont_mask"]
    width = prefix_ids.shape[1]
    want_logprobs = cfg.needs_logprobs
    impl, head = output_head(model, cfg, batch) if cfg.mle != "no" else ("logits", None)
    if cfg.mle in ("weight", "hf"):
        ids, mask = torch.cat([prefix_ids, cont_ids], 1), torch.cat([prefix_mask, cont_mask], 1)
        parts = 3 if cfg.cl_anchor == "detached" else 2  # detached: the anchor is re-read on the prefix cache too
        rows = batch["triplet_rows"] if cfg.contrastive else None
        recorder = recording_cache(model, rows, prefix_mask) if cfg.contrastive else None
        with final_hidden(model) as full, serving(model, recorder):
            out = lm_forward(model, ids, mask, batch["position_ids"], cache=recorder, use_cache=recorder is not None,
                             logits=impl == "logits")
        lm = lm_loss(impl, head, out.logits, full["hidden"], ids, mask,
                     torch.cat([torch.zeros_like(prefix_mask), cont_mask], 1), cfg.mle, cfg, batch["lm_target_counts"])
        if not cfg.contrastive:
            return lm, {"lm_loss": lm.detach()}
        # Positives and negatives only for rows that have a triplet (rows without one are masked out anyway).
        pairs = torch.stack([2 * rows, 2 * rows + 1], 1).flatten()
        anchor = representation(full["hidden"][rows, width:], cont_mask[rows], cfg.cl_repr) if parts == 2 else None
        first_logits = None
        if want_logprobs:
            first_logits = out.logits[rows, width - 1] if impl == "logits" else head(full["hidden"][rows, width - 1])
        cache = reuse_prefix_cache(recorder, parts)
        if cache is None:
            cache, _ = prefix_cache(model, batch, parts, rows)
        del out, full, recorder
        ids, mask, positions = (batch[key][pairs] for key in ("contrast_ids", "contrast_mask", "contrast_position_ids"))
        if parts == 3:
            columns = max(cont_ids.shape[1], ids.shape[1])
            ids = _interleave(_pad_right(cont_ids[rows], columns), _pad_right(ids, columns))
            mask = _interleave(_pad_right(cont_mask[rows], columns), _pad_right(mask, columns))
            positions = _interleave(_pad_right(batch["position_ids"][rows, width:], columns),
                                    _pad_right(positions, columns))
        # right-padded: drop the columns only rows without a triplet used
        longest = max(batch["longest_pair"], batch["longest_anchor"] if parts == 3 else 0)
        columns = contrast_columns(longest, mask.shape[1], batch.get("width_multiple", 1))
        ids, mask, positions = ids[:, :columns], mask[:, :columns], positions[:, :columns]
        with final_hidden(model) as contrast, serving(model, cache):
            out = lm_forward(model, ids, torch.cat([prefix_mask[rows].repeat_interleave(parts, 0), mask], 1), positions,
                             cache=cache, use_cache=True, logits=want_logprobs)
        del cache
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
        with final_hidden(model) as store, serving(model, cache):
            out = lm_forward(model, ids, torch.cat([prefix_mask.repeat_interleave(3, 0), mask], 1), positions,
                             cache=cache, use_cache=True,
                             logits=(cfg.mle == "nograd" and impl == "logits") or want_logprobs)
        del cache
        hidden = store["hidden"]
        lm = (lm_loss(impl, head, out.logits[0::3] if impl == "logits" else None, hidden[0::3], ids[0::3], mask[0::3],
                      mask[0::3], "nograd", cfg, batch["lm_target_counts"])
              if cfg.mle == "nograd" else hidden.new_zeros((), dtype=torch.float32))
        inputs = _contrast_inputs(hidden, ids, mask, 3, cfg, batch["triplet_mask"],
                                  logits=out.logits if want_logprobs else None, first_logits=first_logits)
    if cfg.needs_reference:
        if reference is None:
            raise ValueError(f"--cl_loss {cfg.cl_loss} needs the reference model")
        inputs.reference_positive_logprobs, inputs.reference_negative_logprobs = reference_logprobs(
            reference, batch, rows if cfg.mle in ("weight", "hf") else None, inputs.positive_mask.shape[1])
    cl = CONTRAST_LOSSES[cfg.cl_loss].fn(inputs, cfg) * cfg.cl_ratio
    if cfg.cl_clip:
        cl = clip_self_reflection(lm, cl)
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics


def contrast_columns(longest: int, width: int, multiple: int = 1) -> int:
    """Columns of the contrast forward (at most `width`): its longest real row, rounded up to `multiple` (a
    bucketed batch's `width_multiple`, so compiled kernels see few shapes; the extra columns are masked)."""
    return min(width, -(-longest // multiple) * multiple)
