"""The transformers internals the code reaches into, in one place: keyword and method renames across 5.x,
the flags checkpointed layers read, which cache layers only append, the attention registries.

Each shim is written for every version hf_compat.py declares (LOWEST 5.17.0 to HIGHEST 5.24.0, the pin):
the suite runs on the pin, and tests/test_versions.py runs the tests that reach these (test_prefix_cache,
test_compile, test_losses, parts of test_switches) again on 5.17.0. A new transformers that breaks one
breaks it here. Kept apart from hf_compat.py, which imports neither torch nor transformers because the
pytest header and the version check of a subprocess read it; this module needs both at import (the
checkpointing class, the registries). The one probe of a version that decides a note, not a code path
(`hf_compat.checkpoint_inside_compiled_layer`), stays there, lazy.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import AttentionInterface

# ---------------------------------------------------------------- the HF model and its forward

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


def forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(unwrap(model).forward).parameters)


def cache_kwarg(params: set[str]) -> str:
    """The keyword a model's forward (with these parameters) takes its KV cache under."""
    return "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it


def output_cache(output):
    cache = getattr(output, "cache", None)  # transformers >= 5.2x; `past_key_values` before
    return cache if cache is not None else getattr(output, "past_key_values", None)


def lm_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               cache=None, use_cache: bool = False, logits: bool = True):
    """One causal-LM forward; `logits=False` asks for the last position's logits only (cheap head)."""
    params = forward_params(model)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    if cache is not None:
        kwargs[cache_kwarg(params)] = cache
    if not logits and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


_CACHE_PARAMS = ("cache", "past_key_values", "past_key_value")  # renamed across transformers versions


def cache_param(module: torch.nn.Module) -> str | None:
    """The name under which `module` takes the KV cache, when it reads its own layer of it (attention modules
    call `cache.update(keys, values, self.layer_idx)`); else None."""
    if not isinstance(getattr(module, "layer_idx", None), int):
        return None
    params = inspect.signature(module.forward).parameters
    return next((name for name in _CACHE_PARAMS if name in params), None)


def plain_dynamic_layer(layer) -> bool:
    """A filled cache layer that only appends (DynamicLayer itself): padding between a prefix and what follows
    is then a masked column like any other. Sliding-window, static or quantized layers keep other state."""
    return type(layer) is DynamicLayer and layer.is_initialized


# ---------------------------------------------------------------- gradient checkpointing

def checkpointing(model: torch.nn.Module) -> bool:
    inner = unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # renamed in transformers 5.2x
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return False


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant (the replay then needs no input that
    requires grad, so peft adapters and the training step's caches work)."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        from common import UserError
        raise UserError(f"--gradient_checkpointing: {type(inner).__name__} does not support gradient checkpointing")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in unwrap(model).modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextmanager
def cache_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run a forward that reads a KV cache without gradient checkpointing.

    Under checkpointing, transformers 5 layers silently DROP a passed cache (the replay would update it
    twice), so a continuation would lose its prefix. Forwards that read a cache which is not one of
    step_cache.py's therefore run unchecked (their activations are kept: more memory, same values)."""
    flagged = checkpointed_layers(model)
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
    """Let checkpointed layers keep a passed cache during the next forward: only for step_cache.py's caches,
    whose update a replay may repeat (it reads the same prefix and records nothing). Where transformers
    cannot keep a cache under checkpointing, the forward runs unchecked (`cache_kept`)."""
    flagged = [m for m in checkpointed_layers(model) if isinstance(m, GradientCheckpointingLayer)]
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


# ---------------------------------------------------------------- attention

def _materialized_mask(*args, **kwargs):
    """sdpa's boolean mask, never skipped for `is_causal`: an attention registered here always applies a mask."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def register_attention(name: str, attention) -> None:
    """Make `attention` what a model whose config says `_attn_implementation = name` calls, with sdpa's mask
    always materialized."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _materialized_mask)
