"""LoRA (--lora_r > 0, through peft): which layers get adapters, and the final save. The merged weights
are written as a plain HF checkpoint, so infer.py and the next round load the student without peft;
the adapter alone is kept beside it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

import distributed
from common import UserError
from hf_internals import unwrap

ADAPTER_DIR = "final_adapter"  # beside <output_dir>/final: the adapter alone
ATTENTION_PARTS = ("attn", "attention")  # a module path through one of these is an attention projection


def _linear_layers(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers (nn.Linear, GPT-2's Conv1D) other than the LM head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and name]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def lora_targets(model: torch.nn.Module, spec: str = "auto") -> list[str]:
    """--lora_targets: module names (peft matches them as name suffixes). auto: the linear layers inside
    attention modules (q_proj,k_proj,v_proj,o_proj for Llama/Qwen/Mistral, q/k/v_proj,out_proj for GPT-J,
    c_attn,attn.c_proj for GPT-2), else every linear layer but the LM head. A name also used outside
    attention (GPT-2's MLP has a c_proj too) is qualified with its parent module's name."""
    linear = _linear_layers(model)
    if spec.strip() != "auto":
        names = [name.strip() for name in spec.split(",")]
        modules = [name for name, _ in model.named_modules() if name]
        missing = [target for target in names if not any(_matches(name, target) for name in modules)]
        leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear})) or "none"
        if missing:
            raise UserError(f"--lora_targets: no module named {', '.join(missing)} in this model (its linear layers: {leaves})")
        # peft would refuse a whole block with its printed structure, many lines long
        kinds = {target: type(module).__name__ for target in names for name, module in model.named_modules()
                 if _matches(name, target) and not any(_matches(layer, target) for layer in linear)}
        if kinds:
            named = ", ".join(f"{target} (a {kind})" for target, kind in kinds.items())
            raise UserError(f"--lora_targets: {named} is not a linear layer; LoRA goes on linear layers (this model's: "
                            f"{leaves})")
        return names
    chosen = [name for name in linear
              if any(part in piece.lower() for piece in name.split(".")[:-1] for part in ATTENTION_PARTS)] or linear
    if not chosen:
        raise UserError("--lora_r: this model has no linear layer to put LoRA adapters on")
    targets: list[str] = []
    for leaf in dict.fromkeys(name.rsplit(".", 1)[-1] for name in chosen):
        if any(_matches(name, leaf) for name in linear if name not in chosen):
            targets += dict.fromkeys(".".join(name.split(".")[-2:]) for name in chosen if _matches(name, leaf))
        else:
            targets.append(leaf)
    return targets


def check_lora_deepspeed(args, ds_config: dict) -> None:
    """LoRA under ZeRO-3 writes the merged final checkpoint from the gathered 16-bit weights."""
    zero = ds_config.get("zero_optimization") or {}
    if args.lora_r and zero.get("stage") == 3 and not (zero.get("stage3_gather_16bit_weights_on_model_save")
                                                       or zero.get("gather_16bit_weights_on_model_save")):
        raise UserError(f"--lora_r with ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
                        f"{args.deepspeed} (the merged final checkpoint is written from the gathered weights)")


def add_lora(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model wrapped in a peft PeftModel with LoRA adapters on --lora_targets; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora_r > 0 needs peft: pip install peft==0.21.2") from None
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, args.lora_targets)
    if distributed.is_main():
        print(f"lora targets ({args.lora_targets.strip()}): " + ",".join(targets))
    # GPT-2's Conv1D stores its weight transposed: peft must know (it would warn and guess otherwise)
    fan_in_fan_out = any(isinstance(module, Conv1D) for name, module in model.named_modules()
                         if any(_matches(name, target) for target in targets))
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    try:
        model = get_peft_model(model, config)
    except (ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--lora_targets {args.lora_targets}: {first[:300]}") from None
    trainable, total = model.get_nb_trainable_parameters()  # counts ZeRO-3 partitioned parameters whole
    if distributed.is_main():
        print(f"lora: r {args.lora_r}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}; trainable parameters "
              f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    return model


def lora_layers(peft_model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[float, bool]]:
    """{module name in the PeftModel's state dict: (scaling, fan_in_fan_out)} of every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: (module.scaling[adapter], bool(getattr(module, "fan_in_fan_out", False)))
            for name, module in peft_model.named_modules() if isinstance(module, LoraLayer) and adapter in module.scaling}


def merge_lora_state(state: dict, layers: dict[str, tuple[float, bool]], adapter: str = "default",
                     prefix: str = "base_model.model.") -> dict:
    """The plain HF state dict of a PeftModel's full state dict: W + scaling * B @ A in each LoRA layer
    (transposed for fan_in_fan_out layers), adapter tensors dropped, peft's prefixes removed."""
    merged = {}
    for key, value in state.items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        module, _, leaf = key.rpartition(".")
        if module.endswith(".base_layer") and leaf == "weight" and module[:-len(".base_layer")] in layers:
            owner = module[:-len(".base_layer")]
            scaling, fan_in_fan_out = layers[owner]
            delta = state[f"{owner}.lora_B.{adapter}.weight"].float() @ state[f"{owner}.lora_A.{adapter}.weight"].float()
            value = (value.float() + scaling * (delta.T if fan_in_fan_out else delta)).to(value.dtype)
        merged[name.replace(".base_layer.", ".")] = value
    return merged


def save_lora(trainer: Trainer, final: Path, adapter_dir: Path) -> None:
    """<output_dir>/final: the merged model as a plain HF checkpoint (what infer.py and the next round
    load); <output_dir>/final_adapter: the adapter alone. Under ZeRO-3 every rank joins the gather."""
    peft_model = trainer.model
    layers = lora_layers(peft_model)
    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)  # collective; only rank 0 gets the weights
    else:
        state = peft_model.state_dict()
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(str(adapter_dir), state_dict=state)  # keeps the adapter's tensors only
        unwrap(peft_model).save_pretrained(str(final), state_dict=merge_lora_state(state, layers))
        trainer.processing_class.save_pretrained(str(final))
    distributed.barrier()
