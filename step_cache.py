"""The training step's KV caches (`shared_step.compute_tailored_loss`): the prefix columns recorded during the
LM forward, and served to the contrast forward.

The LM forward passes a recording cache that keeps only the prefix columns of the triplet rows
(detached); the contrast forward reads them through a cache that joins [prefix | new] without
storing anything or repeating the prefix per continuation. Both caches' `update` is a pure
function of its inputs, so under gradient checkpointing the layers may keep them
(`hf_internals.checkpoint_with_cache`; transformers 5 layers drop any other passed cache, whose replay
would grow it twice) and every forward stays checkpointed. When the model's cache layers are not plain
(sliding windows), or the installed transformers cannot let a checkpointed layer keep a cache, the
prefix is run once more without grad (`prefix_cache`), and a forward that reads a cache the layers would
drop runs unchecked (`hf_internals.cache_kept`).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from hf_internals import (CAN_KEEP_CACHE, cache_kept, cache_param, checkpoint_with_cache, checkpointed_layers,
                          lm_forward, output_cache, plain_dynamic_layer, unwrap)


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
    if checkpointed and not CAN_KEEP_CACHE and checkpointed_layers(model):
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
        out = lm_forward(model, batch["prefix_ids"][pick], batch["prefix_mask"][pick],
                         batch["position_ids"][pick, :width], cache=recorder, use_cache=True, logits=False)
    cache = output_cache(out)
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(layer, _RecordingLayer) or plain_dynamic_layer(layer) for layer in layers):
        cache = _served(layers, repeats)
    else:
        cache.batch_repeat_interleave(repeats)
    return cache, out.logits[:, -1]


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
        param = cache_param(module)
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
