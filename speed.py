"""Throughput switches (--attn_implementation, --lm_loss_impl, --torch_compile, --pad_to_multiple_of): each changes
how fast a step runs, never the losses it computes (tests/test_switches.py). Apart from the run's setup because
bench/bench_gpu_step.py times the bare step with these same helpers.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import distributed
import precision
from common import UserError
from hf_internals import unwrap
from train_batches import TailoredCollator, positions_from_mask


def check_switches(args, ds_config: dict | None) -> None:
    """The switches that need a package or rule out a setup, checked before anything slow starts."""
    if args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("--attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                        "sdpa needs nothing")
    if args.lm_loss_impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("--lm_loss_impl liger needs liger-kernel (pip install liger-kernel); chunked needs nothing")
        if ((ds_config or {}).get("zero_optimization") or {}).get("stage") == 3:
            raise UserError("--lm_loss_impl liger reads the output head's weight, which ZeRO-3 partitions; use chunked")


def attention_implementation(requested: str, config) -> str | None:
    """--attn_implementation for from_pretrained; auto: sdpa where the architecture has it, else eager (said once).
    None (transformers decides) for an architecture this transformers does not know (remote code)."""
    if requested != "auto":
        return requested
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None
    if getattr(cls, "_supports_sdpa", False):
        return "sdpa"
    if distributed.is_main():
        print(f"note: {cls.__name__} has no sdpa attention in this transformers; --attn_implementation auto uses eager")
    return "eager"


def model_kwargs(args, config) -> dict:
    """from_pretrained keywords: the attention kernel of --attn_implementation, and the dtype the weights
    train in (precision.load_dtype: float32 unless --bf16_weights or a frozen LoRA base)."""
    kwargs = {"dtype": precision.load_dtype(args)}
    attention = attention_implementation(args.attn_implementation, config)
    if attention:
        kwargs["attn_implementation"] = attention
    return kwargs


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile each decoder layer (transformers' regional compilation). All layers share their graphs,
    one per kind of forward the step runs, however deep the model: the step hands each attention module its
    own cache layer (step_cache.own_layers), so no graph depends on a layer's index. Dynamo's recompile
    limit (8) counts the graphs of all layers and kinds together; a batch with a single row with a triplet
    adds one set of graphs once (dynamo specialises sizes 0 and 1).

    Shapes are dynamic from the first graph: even bucketed (BucketedCollator), the widths and the number of
    rows with a triplet change from batch to batch, and a static first graph per kind would only be
    replaced at the first change. Under gradient checkpointing, the LM forward's cache layer records the
    prefix K/V inside the checkpointed layer, a side effect dynamo refuses unless told that the replay in
    backward may skip it, which is what the recording layer does anyway (it records once). Returns the
    number of layers compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    if not layers:
        raise UserError("--torch_compile: found no decoder layer to compile in this model")
    return len(layers)


def bucket_batch(batch: dict, multiple: int, pad_token_id: int) -> dict:
    """A TailoredCollator batch with the prefix width (padded on the left), the continuation width and the
    positive/negative width (on the right) rounded up to a multiple of `multiple`. The new columns are
    masked, so every loss keeps its value; position ids are rebuilt the collator's way."""
    def padded(ids, mask, left=False):
        extra = -ids.shape[1] % multiple
        sides = (extra, 0) if left else (0, extra)
        return torch.nn.functional.pad(ids, sides, value=pad_token_id), torch.nn.functional.pad(mask, sides, value=0)

    out = dict(batch, width_multiple=multiple)  # compute_tailored_loss rounds its trimmed widths up the same way
    out["prefix_ids"], out["prefix_mask"] = padded(batch["prefix_ids"], batch["prefix_mask"], left=True)
    out["cont_ids"], out["cont_mask"] = padded(batch["cont_ids"], batch["cont_mask"])
    out["position_ids"] = positions_from_mask(torch.cat([out["prefix_mask"], out["cont_mask"]], 1))
    if "contrast_ids" in batch:
        out["contrast_ids"], out["contrast_mask"] = padded(batch["contrast_ids"], batch["contrast_mask"])
        prefix_len = out["prefix_mask"].sum(1).repeat_interleave(2)
        out["contrast_position_ids"] = positions_from_mask(out["contrast_mask"], prefix_len)
    return out


@dataclass
class BucketedCollator:
    """--pad_to_multiple_of N (64 with --torch_compile): the collator's batches, widths rounded up (bucket_batch)."""
    collator: TailoredCollator
    multiple: int

    def __call__(self, features: list[dict]) -> dict:
        return bucket_batch(self.collator(features), self.multiple, self.collator.pad_token_id)
