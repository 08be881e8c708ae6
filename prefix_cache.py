"""Few-shot generation's shared-prefix KV cache (`SamplingConfig.prefix_cache`, --prefix_cache).

Tokens that every prompt of a `generation.generate` call opens with (the few-shot demos) are run through
the model once; every batch continues from their KV cache and prefills only the rows' own tokens. Where the
model's attention goes through transformers' attention interface, the rows read one copy of the prefix
(`shared_prefix_attention`); otherwise each row gets a copy. Every row's tokens and positions are those it
has without the cache, so the texts are the same (tests/test_prefix_cache.py).
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import DynamicLayer

from hf_internals import cache_kwarg, forward_params, output_cache, plain_dynamic_layer, register_attention

# Below this many shared tokens (zero-shot prompts share only "Question:") the saved prefill is too
# small to matter, and the plain left-padded path stays the one that runs.
MIN_SHARED_PREFIX = 16


@dataclass
class SharedPrefix:
    """The first `length` tokens every prompt of a call starts with, and their KV cache (batch 1).

    The cache is never handed to `generate` itself, which extends the cache it is given: each batch gets
    a cache of its own that reads this one (`_batch_cache`)."""
    ids: list[int]
    cache: object
    shared_attention: bool = False  # rows read one copy of it (`shared_prefix_attention`), not their own

    @property
    def length(self) -> int:
        return len(self.ids)


def shared_prefix_length(ids: list[list[int]]) -> int:
    """Length of the longest token prefix all rows share, backed off so that every row keeps at least
    one token of its own: the forward that continues from the cache needs one to give next-token logits.

    Cutting the rows' own ids (never re-tokenizing a cut text) keeps every row exactly `tokenizer(prompt)`,
    wherever BPE merges across the demo/question boundary."""
    if not ids:
        return 0
    common = os.path.commonprefix(ids)  # element-wise on lists too
    return max(0, min(len(common), min(map(len, ids)) - 1))


def _hf_model(model):
    """The HF model whose `generate` runs (peft keeps it inside)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def build_shared_prefix(model, ids: list[list[int]], min_length: int = MIN_SHARED_PREFIX) -> SharedPrefix | None:
    """The shared prefix of `ids` with its KV cache, or None when prompts share fewer than `min_length`
    tokens or the model cannot take it (then every batch prefills whole prompts, as before).

    Deterministic in `ids` and the model, so under ZeRO-3 every rank makes the same choice and runs the
    same one forward."""
    length = shared_prefix_length(ids)
    hf = _hf_model(model)
    params = forward_params(hf)
    # the rows' positions are not their column index once padding sits between prefix and suffix
    if length < min_length or "position_ids" not in params:
        return None
    prefix = torch.tensor([ids[0][:length]], device=hf.device)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the logits are not needed
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **kwargs)
    cache = output_cache(out)
    layers = getattr(cache, "layers", None)
    if not (layers and all(map(plain_dynamic_layer, layers))):
        return None
    return SharedPrefix(ids=ids[0][:length], cache=cache, shared_attention=shares_prefix_attention(model))


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for the tokens to come.

    DynamicLayer appends by torch.cat, copying the whole cache every step: with few-shot prompts that
    copy (rows x demos long, every layer, every new token) costs as much as the attention itself.
    Here a step writes only its new columns; `keys`/`values` are views of the filled part, the same
    values a DynamicLayer would hold."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._adopt(keys, values, room)

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        length = keys.shape[-2]
        self._keys = keys.new_empty(*keys.shape[:-2], length + room, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:-2], length + room, values.shape[-1])
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # e.g. ZeRO-3 ranks stepping on for a slower rank: grow, doubling
            self._adopt(self.keys, self.values, max(end - self.length, self._keys.shape[-2]))
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    # the rest of DynamicLayer's edits replace `keys`/`values`: take the results back into a buffer
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt(self.keys, self.values, 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt(self.keys, self.values, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt(self.keys, self.values, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt(self.keys, self.values, 0)


class SharedPrefixLayer(BufferedLayer):
    """The rows' own keys and values (after the shared prefix) in a buffer, and the prefix's once (batch 1)
    for all rows: `shared_prefix_attention` reads the prefix part without copying it per row.

    Lengths and mask sizes count the prefix, so positions and masks are those of the whole rows; `update`
    returns the own part only, which is why this layer runs only under that attention."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int, room: int):
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        own = prefix_keys.new_empty(rows, *prefix_keys.shape[1:-2], 0, prefix_keys.shape[-1])
        super().__init__(own, prefix_values.new_empty(own.shape[:-1] + prefix_values.shape[-1:]), room)

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length


SHARED_PREFIX_ATTENTION = "tailored_shared_prefix"
_active_cache: ContextVar = ContextVar("shared_prefix_cache")


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs):
    """Attention over [shared prefix | the row's own tokens] where the prefix keys/values are stored once.

    Decoding is memory-bound on a CPU: with per-row copies every step reads rows x prefix keys and values
    (the few-shot demos, most of each row); here the prefix part is one matmul of all rows' queries
    against one copy. One softmax over both parts (scores side by side), in float32 as eager attention.
    query (B, Hq, S, D); key/value: the rows' own part (B, Hkv, T, D); the mask spans prefix + own."""
    layer = _active_cache.get().layers[module.layer_idx]
    b, hq, s, d = query.shape
    hkv, own_len, prefix_len = key.shape[1], key.shape[2], layer.prefix_keys.shape[-2]
    rows = hq // hkv * s  # queries per kv head (grouped-query heads share one)
    scaling = d ** -0.5 if scaling is None else scaling
    q = query.float().reshape(b, hkv, rows, d)
    own = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, rows, T)
    if attention_mask is None:
        raise RuntimeError("shared-prefix attention needs a materialized mask")
    mask = attention_mask[..., prefix_len:]  # the prefix precedes every query: nothing to mask there
    mask = mask.unsqueeze(2).expand(b, mask.shape[1], hq // hkv, s, own_len).reshape(b, -1, rows, own_len)
    own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask
    by_head = q.transpose(0, 1).reshape(hkv, b * rows, d)  # all rows' queries against the one prefix copy
    shared = torch.matmul(by_head, layer.prefix_keys[0].float().transpose(-1, -2)) * scaling
    shared = shared.view(hkv, b, rows, prefix_len).transpose(0, 1)
    probs = torch.cat([shared, own], -1).softmax(-1)
    out = torch.matmul(probs[..., prefix_len:], value.float())
    prefix_probs = probs[..., :prefix_len].transpose(0, 1).reshape(hkv, b * rows, prefix_len)
    out += torch.matmul(prefix_probs, layer.prefix_values[0].float()).view(hkv, b, rows, d).transpose(0, 1)
    return out.view(b, hq, s, d).transpose(1, 2).to(query.dtype).contiguous(), None


register_attention(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def shares_prefix_attention(model) -> bool:
    """Whether `shared_prefix_attention` can stand in for the model's attention: its attention layers call
    the registered interface (`_supports_attention_backend`), with plain sdpa/eager math (no logit
    soft-capping or attention sinks)."""
    hf = _hf_model(model)
    config = hf.config
    return (getattr(type(hf), "_supports_attention_backend", False) and config._attn_implementation in ("sdpa", "eager")
            and not getattr(config, "attn_logit_softcapping", None)
            and not any(hasattr(m, "sinks") for m in hf.modules())
            and all(hasattr(m, "layer_idx") for m in hf.modules() if type(m).__name__.endswith("Attention")))


@contextmanager
def prefix_attention(model, cache) -> Iterator[None]:
    """Run the model under `shared_prefix_attention` reading `cache`, then restore its attention."""
    configs = {id(m.config): m.config for m in _hf_model(model).modules() if hasattr(m, "config")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    token = _active_cache.set(cache)
    try:
        for config in configs.values():
            config._attn_implementation = SHARED_PREFIX_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]
        _active_cache.reset(token)


def _batch_cache(prefix: SharedPrefix, rows: int, room: int, shared: bool):
    """A private cache for one `generate` call of `rows` rows (prompts x samples), holding the prefix
    and room for `room` more tokens per row: the prefix once (`shared`, for `shared_prefix_attention`),
    else copied into every row. The stored cache is never written."""
    cache = copy.copy(prefix.cache)
    if shared:
        cache.layers = [SharedPrefixLayer(layer.keys, layer.values, rows, room) for layer in prefix.cache.layers]
    else:
        cache.layers = [BufferedLayer(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1),
                                      room) for layer in prefix.cache.layers]
    return cache


def encode_with_prefix(rows: list[list[int]], prefix_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows as [shared prefix | padding | own suffix]: suffixes right-aligned (generation appends at the
    right edge), the padding masked out. `generate` derives position ids from the mask (cumsum), so each
    row's tokens keep the positions 0..len-1 they have unpadded, the same as with left padding."""
    width = max(map(len, rows)) - prefix_length
    ids = torch.full((len(rows), prefix_length + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :prefix_length] = torch.tensor(rows[0][:prefix_length])
    mask[:, :prefix_length] = 1
    for i, row in enumerate(rows):
        suffix = row[prefix_length:]
        ids[i, ids.shape[1] - len(suffix):] = torch.tensor(suffix)
        mask[i, ids.shape[1] - len(suffix):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@contextmanager
def continuing_from(model, prefix: SharedPrefix, rows: int, room: int) -> Iterator[dict]:
    """`generate`'s keyword arguments for one call of `rows` rows that continue from `prefix` (their own cache,
    with room for `room` more tokens per row), run under `shared_prefix_attention` when the rows share one
    copy of the prefix."""
    cache = _batch_cache(prefix, rows, room, prefix.shared_attention)
    with prefix_attention(model, cache) if prefix.shared_attention else nullcontext():
        yield {cache_kwarg(forward_params(_hf_model(model))): cache}
