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
The LM forward passes a recording cache that keeps only the prefix columns of the triplet rows
(detached); the contrast forward reads them through a cache that joins [prefix | new] without
storing anything or repeating the prefix per continuation. Both caches' `update` is a pure
function of its inputs, so under gradient checkpointing the layers may keep them
(`checkpoint_with_cache`; transformers 5 layers drop any other passed cache, whose replay would
grow it twice) and every forward stays checkpointed. When the model's cache layers are not plain
(sliding windows), or the installed transformers cannot let a checkpointed layer keep a cache, the
prefix is run once more without grad (3 forwards), and a forward that reads a cache the layers would
drop runs unchecked (`cache_kept`).

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
(--lora_r) work; only `liger` reads the head's weight itself, and is refused under ZeRO-3. The cache and keyword renames of
transformers 5.x live here too.
"""
from __future__ import annotations

import inspect
import re
import weakref
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

import distributed
from losses import (CONTRAST_LOSSES, ContrastInputs, LossConfig, chunked_lm_loss, clip_self_reflection, liger_lm_loss,
                    representation, token_logprobs, weighted_lm_loss)

# ---------------------------------------------------------------- model plumbing

def _is_peft(model: torch.nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "peft" and callable(getattr(model, "get_base_model", None))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / DeepSpeedEngine / accelerate wrappers (they all keep it in .module),
    inside torch.compile's OptimizedModule (._orig_mod) and inside a peft `PeftModel` (--lora_r > 0:
    the HF model with the adapters injected)."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
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


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant (the replay then needs no input that
    requires grad, so peft adapters and the caches below work)."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        from common import UserError
        raise UserError(f"--gradient_checkpointing: {type(inner).__name__} does not support gradient checkpointing")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in unwrap(model).modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextmanager
def cache_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run a forward that reads a KV cache without gradient checkpointing.

    Under checkpointing, transformers 5 layers silently DROP a passed cache (the replay would update it
    twice), so a continuation would lose its prefix. Forwards that read a cache which is not one of ours
    (below) therefore run unchecked (their activations are kept: more memory, same values)."""
    flagged = _checkpointed_layers(model)
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


CAN_KEEP_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")  # transformers >= 5.2x


@contextmanager
def checkpoint_with_cache(model: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep a passed cache during the next forward: only for `_RecordingLayer` /
    `_PrefixLayer` caches, whose update a replay may repeat (it reads the same prefix and records nothing).
    Where transformers cannot keep a cache under checkpointing, the forward runs unchecked (`cache_kept`)."""
    flagged = [m for m in _checkpointed_layers(model) if isinstance(m, GradientCheckpointingLayer)]
    if flagged and not CAN_KEEP_CACHE:
        with cache_kept(model):
            yield
        return
    for module in flagged:
        module._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for module in flagged:
            del module._can_checkpoint_with_cache  # back to the class's False


# ---------------------------------------------------------------- prefix caches

class _RecordingLayer(DynamicLayer):
    """The LM forward's cache layer: keeps a detached copy of the prefix columns of the rows that have a
    triplet (so the full-width cache of every row never exists) and hands the new K/V back unchanged, so
    the forward attends exactly as it would without a cache. A replay records nothing again. `rows` None:
    every row (the prefix forward of `prefix_cache`)."""

    def __init__(self, rows: torch.Tensor | None, prefix_mask: torch.Tensor):
        super().__init__()
        # The width is read from the prefix mask's shape, not kept as an int: compiled, an int attribute is a
        # constant (a new graph per prefix width), a tensor's size is a symbol.
        self.rows, self.prefix_mask, self.done = rows, prefix_mask, False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.done:
            # Detached: the triplet loss must not push gradients into the prefix through pos/neg (as in the
            # original, whose prefix ran without grad). Detached before indexing, so autograd records
            # nothing here that a replay (which skips this) would miss; indexing rows copies.
            rows = slice(None) if self.rows is None else self.rows
            width = self.prefix_mask.shape[1]
            self.keys = key_states.detach()[rows, :, :width]
            self.values = value_states.detach()[rows, :, :width]
            self.device, self.is_initialized, self.done = key_states.device, True, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # nothing before the forward's own tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0


class _PrefixLayer(DynamicLayer):
    """A prefix's K/V (N rows) read by `repeats` continuations per row: `update` returns [prefix | new]
    and stores nothing, so the prefix is neither kept repeated nor grown."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int):
        super().__init__()
        self.keys, self.values, self.repeats = keys, values, repeats
        self.device, self.is_initialized = keys.device, True

    def _joined(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # One allocation: the expanded prefix and the new states meet in the cat (row i's continuations are
        # rows i*repeats ... of `new`, the order of Cache.batch_repeat_interleave).
        n, r = prefix.shape[0], self.repeats
        joined = torch.cat([prefix.unsqueeze(1).expand(n, r, *prefix.shape[1:]), new.view(n, r, *new.shape[1:])], -2)
        return joined.view(n * r, *joined.shape[2:])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._joined(self.keys, key_states), self._joined(self.values, value_states)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeats *= repeats


class _PrefixCache(DynamicCache):
    def __init__(self, layers: list[DynamicLayer]):
        Cache.__init__(self, layers=layers)


def recording_cache(model: torch.nn.Module, rows: torch.Tensor | None, prefix_mask: torch.Tensor,
                    checkpointed: bool = True) -> _PrefixCache | None:
    """A cache for the LM forward that records the prefix (the columns of `prefix_mask`) of `rows`; None when
    the model's cache layers are not all plain (sliding windows, shared or linear-attention layers): the prefix
    is then recomputed. `checkpointed`: the forward will run under the model's checkpointing, if it has any."""
    if checkpointed and not CAN_KEEP_CACHE and _checkpointed_layers(model):
        return None  # the layers would drop it; recomputing the prefix keeps the LM forward checkpointed
    config = unwrap(model).config
    try:
        layers = DynamicCache(config=config).layers
        count = config.get_text_config(decoder=True).num_hidden_layers
    except Exception:  # an architecture whose cache this cannot describe: take the general path
        return None
    if len(layers) != count or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return _PrefixCache([_RecordingLayer(rows, prefix_mask) for _ in range(count)])


def _served(layers: list[DynamicLayer], repeats: int) -> _PrefixCache:
    """The layers' K/V as a prefix cache, each row read `repeats` times."""
    served = _PrefixCache([_PrefixLayer(layer.keys, layer.values, repeats) for layer in layers])
    for layer in layers:  # the served cache holds the only reference: freed with it
        layer.keys = layer.values = None
    return served


def reuse_prefix_cache(cache, repeats: int) -> _PrefixCache | None:
    """The LM forward's recorded prefix as the cache of the contrast forward (each row read `repeats` times);
    None when nothing was recorded (e.g. a transformers that drops caches under checkpointing)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(layer, _RecordingLayer) and layer.done for layer in layers):
        return None
    return _served(layers, repeats)


def prefix_cache(model: torch.nn.Module, batch: dict, repeats: int, rows: torch.Tensor | None = None):
    """(KV cache of the left-padded prefixes (of `rows`), computed without grad, each row read `repeats`
    times; the prefixes' last-position logits (N, V), which predict every continuation's first token)."""
    width = batch["prefix_ids"].shape[1]
    pick = slice(None) if rows is None else rows
    # One of ours rather than the model's own cache, which a compiled layer would pick by layer index. No grad:
    # nothing is kept for backward, so checkpointing is off (some transformers drop a cache under it).
    recorder = recording_cache(model, None, batch["prefix_mask"], checkpointed=False)
    with torch.no_grad(), cache_kept(model), (own_layers(model, recorder) if recorder is not None else nullcontext()):
        out = _forward(model, batch["prefix_ids"][pick], batch["prefix_mask"][pick],
                       batch["position_ids"][pick, :width], cache=recorder, use_cache=True, logits=False)
    cache = _output_cache(out)
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(layer, _RecordingLayer) or (type(layer) is DynamicLayer and layer.is_initialized)
                      for layer in layers):
        cache = _served(layers, repeats)
    else:
        cache.batch_repeat_interleave(repeats)
    return cache, out.logits[:, -1]


_CACHE_PARAMS = ("cache", "past_key_values", "past_key_value")  # renamed across transformers versions


def _cache_param(module: torch.nn.Module) -> str | None:
    """The name under which `module` takes the KV cache, when it reads its own layer of it (attention modules
    call `cache.update(keys, values, self.layer_idx)`); else None."""
    if not isinstance(getattr(module, "layer_idx", None), int):
        return None
    params = inspect.signature(module.forward).parameters
    return next((name for name in _CACHE_PARAMS if name in params), None)


def _own_layer(layer: DynamicLayer, param: str, module: torch.nn.Module, args: tuple, kwargs: dict):
    return args, {**kwargs, param: layer}


@contextmanager
def own_layers(model: torch.nn.Module, cache: _PrefixCache) -> Iterator[None]:
    """During the next forward, hand each attention module its own layer of `cache` (a forward pre-hook).

    A compiled layer (--torch_compile) would pick it as `cache.layers[self.layer_idx]`: dynamo specialises
    on the index, so every decoder layer got its own graph and a 12-layer model hit the recompile limit in
    the first step. Handed over, the layer is an input like any other and all decoder layers share a graph.
    The model still gets `cache`: mask sizes come from it, and so does a checkpointed layer's replay in
    backward, which runs after the hooks are gone and reaches the same layer through it."""
    handles = []
    for module in unwrap(model).modules():
        param = _cache_param(module)
        if param is not None:
            hook = partial(_own_layer, cache.layers[module.layer_idx], param)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def serving(model: torch.nn.Module, cache) -> Iterator[None]:
    """How a forward that passes `cache` is run: one of ours (`_PrefixCache`) stays passed under gradient
    checkpointing and each attention module gets its own layer; any other runs unchecked (`cache_kept`)."""
    if cache is None:
        yield
    elif isinstance(cache, _PrefixCache):
        with checkpoint_with_cache(model), own_layers(model, cache):
            yield
    else:
        with cache_kept(model):
            yield


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
    elif "logits_to_keep" not in _forward_params(model):
        why = f"{type(inner).__name__}.forward takes no logits_to_keep"
    elif changing:
        why = f"its logits are not the head's output ({', '.join(changing)})"
    else:
        ids, mask = batch["cont_ids"][:1, :8], torch.ones_like(batch["cont_mask"][:1, :8])
        with torch.no_grad(), final_hidden(model) as store:
            logits = _forward(model, ids, mask, torch.arange(ids.shape[1], device=ids.device)[None]).logits
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


def compute_tailored_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Total loss (LM + cl_ratio * self-reflection) and detached metrics lm_loss, cl_loss, triplet_fraction.

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
            out = _forward(model, ids, mask, batch["position_ids"], cache=recorder, use_cache=recorder is not None,
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
            out = _forward(model, ids, torch.cat([prefix_mask[rows].repeat_interleave(parts, 0), mask], 1), positions,
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
            out = _forward(model, ids, torch.cat([prefix_mask.repeat_interleave(3, 0), mask], 1), positions,
                           cache=cache, use_cache=True, logits=(cfg.mle == "nograd" and impl == "logits") or want_logprobs)
        del cache
        hidden = store["hidden"]
        lm = (lm_loss(impl, head, out.logits[0::3] if impl == "logits" else None, hidden[0::3], ids[0::3], mask[0::3],
                      mask[0::3], "nograd", cfg, batch["lm_target_counts"])
              if cfg.mle == "nograd" else hidden.new_zeros((), dtype=torch.float32))
        inputs = _contrast_inputs(hidden, ids, mask, 3, cfg, batch["triplet_mask"],
                                  logits=out.logits if want_logprobs else None, first_logits=first_logits)
    cl = CONTRAST_LOSSES[cfg.cl_loss].fn(inputs, cfg) * cfg.cl_ratio
    if cfg.cl_clip:
        cl = clip_self_reflection(lm, cl)
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics


def contrast_columns(longest: int, width: int, multiple: int = 1) -> int:
    """Columns of the contrast forward (at most `width`): its longest real row, rounded up to `multiple` (a
    bucketed batch's `width_multiple`, so compiled kernels see few shapes; the extra columns are masked)."""
    return min(width, -(-longest // multiple) * multiple)
