"""The HF `Trainer` subclass behind run_trainer.py: tailored losses, question-unique batches,
accuracy by generation at each epoch, best-K checkpoints, redacted configs beside each save.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

import distributed
import hf_compat
import precision
from args import ORIGINAL_TRAIN_DEFAULTS, as_dict, differing_defaults
from common import UserError, atomic_write_json, check_output_dir, read_json, redact, set_seed
from generation import SamplingConfig, evaluate
from hf_internals import enable_checkpointing, unwrap
from losses import LossConfig, clip_self_reflection
from model_loading import (check_model_path, load_config, load_tokenizer, load_weights, max_positions,
                           tokenizer_source)
from shared_step import compute_tailored_loss
from tasks import get_task, has_validation, load_demos, load_split
from train_data import (TailoredCollator, TailoredDataset, UniqueQuestionBatchSampler, build_train_data,
                        positions_from_mask)

METRICS = ("lm_loss", "cl_loss", "triplet_fraction")
WARMUP_LOG = "warmup_log"  # --lr_scheduler_type of the original's DeepSpeed WarmupLR (warmup_log_factor)


class TailoredTrainer(Trainer):
    """`eval_setup`: dict(task, examples, demos, rationale, sampling) for accuracy by generation."""

    def __init__(self, *args, loss_cfg: LossConfig, merge_losses: bool = True, eval_setup: dict | None = None,
                 lr_schedule: str = WARMUP_LOG, first_eval: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_schedule = lr_schedule
        if first_eval:
            self.add_callback(FirstEvalCallback(self))
        self.model_accepts_loss_kwargs = False  # our loss is a mean per batch: let Trainer scale for accumulation
        self.add_callback(EpochSeedCallback(self))
        self.add_callback(LossTotalCallback(self))
        self.loss_before_resume = (0, 0.0)  # (steps, summed loss) of the run this one resumes
        self._batch_sampler: UniqueQuestionBatchSampler | None = None
        self.loss_cfg = loss_cfg
        self.merge_losses = merge_losses
        self.eval_setup = eval_setup
        self._running = {name: [] for name in METRICS}
        self.eval_history: list[dict] = []

    # ------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """Global batches with distinct questions; accelerate deals whole batches to the ranks."""
        self._batch_sampler = UniqueQuestionBatchSampler(self.train_dataset.row_questions(),
                                                         self.args.per_device_train_batch_size, seed=self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=self._batch_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------ losses
    def _record(self, metrics: dict) -> None:
        # Kept as tensors until a log reads them: a float() here would wait for the GPU every step.
        for name in METRICS:
            if name in metrics:
                value = metrics[name]
                self._running[name].append(value.detach() if torch.is_tensor(value) else torch.tensor(float(value)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = compute_tailored_loss(model, inputs, self.loss_cfg)
        self._record(metrics)
        return (loss, metrics) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self._losses_step(model, inputs, num_items_in_batch)
        # The Trainer's logging_nan_inf_filter (turned off in training_arguments: its check waits for the GPU
        # every step), as a tensor op: a non-finite step loss counts as the mean of the steps since the last log.
        since = 1 + self.state.global_step - self._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, self._tr_loss.to(loss.device) / since)

    def _losses_step(self, model, inputs, num_items_in_batch=None):
        """--merge_losses no: LM and triplet losses get separate backward passes (lower peak memory,
        same gradient sum). DeepSpeed steps inside every backward, so there we always merge."""
        if self.merge_losses or not self.loss_cfg.contrastive or self.loss_cfg.mle == "no" or self.is_deepspeed_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.args.gradient_accumulation_steps
        total = torch.zeros((), device=self.args.device)
        lm = None
        for cfg in (replace(self.loss_cfg, contrastive=False), replace(self.loss_cfg, mle="no", cl_clip=False)):
            with self.compute_loss_context_manager():
                loss, metrics = compute_tailored_loss(model, inputs, cfg)
            if lm is None:
                lm = loss.detach()
            elif self.loss_cfg.cl_clip:  # the second pass is the self-reflection loss alone
                loss = clip_self_reflection(lm, loss)
                metrics["cl_loss"] = loss.detach()
            self._record(metrics)
            self.accelerator.backward(loss * scale)
            total = total + loss.detach() * scale
        return total

    def _get_grad_norm(self, model, grad_norm=None):
        """Without clipping (--max_grad_norm 0) the gradient norm only feeds the log, which shows the norm of
        the step it logs at: computed on those steps only (the same logged values), not in every step."""
        if grad_norm is None and not self.is_deepspeed_enabled and not self._logs_after_this_step():
            return None
        return super()._get_grad_norm(model, grad_norm)

    def _logs_after_this_step(self) -> bool:
        """Whether DefaultFlowCallback will log once the optimizer step now running ends."""
        step, args = self.state.global_step + 1, self.args
        if args.logging_strategy != "steps":
            return True
        return (step == 1 and args.logging_first_step) or step % (self.state.logging_steps or args.logging_steps) == 0

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """--lr_scheduler_type warmup_log: the original's schedule outside DeepSpeed too."""
        if self.lr_schedule != WARMUP_LOG:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, functools.partial(warmup_log_factor, warmup_steps=warmup))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def loss_sum(self) -> float:
        """Summed training loss of every step so far, the resumed-from run's included."""
        # before training starts the Trainer has no running totals yet
        return self.loss_before_resume[1] + getattr(self, "_total_loss_scalar", 0.0) + float(getattr(self, "_tr_loss", 0.0))

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the means of our parts since the last one
            for name, values in self._running.items():
                if values:
                    values = torch.stack([v.float().to(values[0].device) for v in values]).tolist()  # one wait
                    logs[name] = round(sum(values) / len(values), 4)
                    self._running[name].clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Accuracy of greedy answers (not a loss): what the paper reports and what --save_best ranks."""
        if not self.eval_setup:
            return {}
        setup = self.eval_setup
        result = evaluate(self.model, self.processing_class, setup["task"], setup["examples"], setup["demos"],
                          setup["rationale"], setup["sampling"], desc=f"eval epoch {self.state.epoch or 0:.0f}",
                          synced=self.is_deepspeed_enabled)
        summary = [None if result is None else {k: result[k] for k in ("acc", "strict_acc", "correct", "total")}]
        if distributed.world_size() > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(summary, src=0)
        summary = summary[0]
        metrics = {f"{metric_key_prefix}_accuracy": summary["acc"],
                   f"{metric_key_prefix}_strict_accuracy": summary["strict_acc"]}
        if self.is_world_process_zero():
            out = Path(self.args.output_dir) / "eval" / f"step{self.state.global_step}.json"
            atomic_write_json(out, {"epoch": self.state.epoch, "step": self.state.global_step, **result})
        self.eval_history.append({"epoch": self.state.epoch, "step": self.state.global_step, **summary})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def warmup_log_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step `step` (from 0) under DeepSpeed's WarmupLR with its
    default log warm-up, the original's schedule. The engine steps that schedule after each optimizer
    step, starting from its minimum (0): steps 0 and 1 run at 0, step s at log(s) / log(W) until it
    reaches 1 at s = W. DeepSpeed counts at least W = 2 warm-up steps."""
    if warmup_steps <= 0:
        return 1.0
    warmup_steps = max(2, warmup_steps)
    iteration = step - 1  # the schedule's own counter when step `step` runs
    if iteration < 0:
        return 0.0
    return math.log(iteration + 1) / math.log(warmup_steps) if iteration < warmup_steps else 1.0


class FirstEvalCallback(TrainerCallback):
    """--do_first_eval: accuracy of the starting model, before the first step (not on a resumed run).
    At train begin rather than before `train()`, so a ZeRO-3 model is already inside its engine."""

    def __init__(self, trainer: "TailoredTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.trainer.evaluate()


class LossTotalCallback(TrainerCallback, ExportableState):
    """The summed loss of every step so far, kept inside each checkpoint's trainer_state.json (written
    in the same file, so a kill can never separate them): a resumed run's mean loss then covers the
    whole run (the Trainer's covers only the steps since the resume)."""

    def __init__(self, trainer: "TailoredTrainer"):
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.trainer.loss_sum()}}

    @staticmethod
    def read(checkpoint: Path) -> tuple[int, float] | None:
        """(steps, summed loss) saved in `checkpoint`, or None for a checkpoint written without it."""
        state = read_json(checkpoint / "trainer_state.json")
        saved = state.get("stateful_callbacks", {}).get("LossTotalCallback")
        return (state["global_step"], saved["attributes"]["loss_sum"]) if saved else None


class EpochSeedCallback(TrainerCallback):
    """Each epoch gets its own batches and positive/negative draws, the same on every rank. Done
    here because accelerate does not pass `set_epoch` through to a sharded custom batch sampler."""

    def __init__(self, trainer: TailoredTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor((state.epoch or 0) + 1e-6)
        self.trainer.train_dataset.set_epoch(epoch)
        if self.trainer._batch_sampler is not None:
            self.trainer._batch_sampler.set_epoch(epoch)


class SaveExtrasCallback(TrainerCallback):
    """Beside each checkpoint: the run's arguments (secrets redacted) and DeepSpeed config; and
    with --save_best K > 0, only the K most accurate epochs (plus the latest, for --resume) stay."""

    def __init__(self, run_args: dict, ds_config: dict | None, save_best: int):
        self.run_args = redact(run_args)
        self.ds_config = ds_config
        self.save_best = save_best

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            atomic_write_json(folder / "run_args.json", self.run_args)
            if self.ds_config:  # as used: after the flags were applied (deepspeed_config)
                atomic_write_json(folder / "ds_config.json", self.ds_config)
        if self.save_best > 0:
            self._keep_best(Path(args.output_dir), state)

    def _keep_best(self, output_dir: Path, state) -> None:
        accuracy = {}
        for entry in state.log_history:
            if "eval_accuracy" in entry:
                accuracy[entry["step"]] = entry["eval_accuracy"]
        saved = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
        if not saved:
            return
        ranked = sorted((s for s in saved if s in accuracy), key=lambda s: (-accuracy[s], -s))
        keep = set(ranked[:self.save_best]) | {saved[-1]}
        for step in saved:
            if step not in keep:
                shutil.rmtree(output_dir / f"checkpoint-{step}", ignore_errors=True)
        if ranked:
            (output_dir / "best_checkpoint.json").write_text(json.dumps(
                {"checkpoint": f"checkpoint-{ranked[0]}", "eval_accuracy": accuracy[ranked[0]]}) + "\n")


# ---------------------------------------------------------------- LoRA (--lora_r > 0, through peft)

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
        if missing:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise UserError(f"--lora_targets: no module named {', '.join(missing)} in this model "
                            f"(its linear layers: {', '.join(leaves) or 'none'})")
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
        raise UserError(f"--lora_targets {args.lora_targets}: {err}") from None
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


def save_lora(trainer: "TailoredTrainer", final: Path, adapter_dir: Path) -> None:
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


# ---------------------------------------------------------------- setup of a run

DEBUG_TRAIN, DEBUG_EVAL = 97, 33  # --debug sizes, the original's


def check_resume(args) -> str | None:
    """--resume PATH: the checkpoint folder to continue from (checked here); None for yes/no."""
    path = args.resume_path
    if path is None:
        return None
    if not Path(path).is_dir():
        raise UserError(f"--resume: {path} is not a folder (expected a checkpoint-<step> folder, or yes/no)")
    if not (Path(path) / "trainer_state.json").is_file():
        raise UserError(f"--resume: {path} has no trainer_state.json: not a complete training checkpoint")
    return path


def default_output_dir(args) -> str:
    return str(Path("checkpoints") / "student_train" / (args.task + (f"_{args.note}" if args.note else "")))


# Fields of TrainArguments that mean something else here: precision is decided by `precision.autocast_precision`, the
# output folder has our default, evaluation is our own accuracy by generation, the rank comes from the launcher.
NOT_PASSED_TO_TRAINER = {"fp16", "bf16", "output_dir", "do_eval", "local_rank", "debug", "lr_scheduler_type", "deepspeed",
                         "logging_steps", "optim", "gradient_checkpointing", "torch_compile"}  # the last three: set_up_model


def training_arguments(args, output_dir: str, bf16: bool, fp16: bool, ds_config: dict | None = None) -> TrainingArguments:
    """TrainingArguments from every TrainArguments field of the same name, plus what this repo fixes."""
    shared = {f.name for f in fields(TrainingArguments)} & {f.name for f in fields(args)} - NOT_PASSED_TO_TRAINER
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        **{name: getattr(args, name) for name in shared}, output_dir=output_dir, bf16=bf16, fp16=fp16,
        lr_scheduler_type="constant" if args.lr_scheduler_type == WARMUP_LOG else args.lr_scheduler_type,  # see create_scheduler
        optim="adamw_torch_fused" if args.optim == "auto" else args.optim,
        deepspeed=ds_config,  # deepspeed_config(args), read once by run_training
        logging_steps=1 if args.debug else args.logging_steps,
        use_cpu=cpu, ddp_backend="gloo" if cpu and distributed.world_size() > 1 else None,
        eval_strategy="epoch" if args.do_eval else "no", logging_first_step=True,
        report_to=["tensorboard"] + (["wandb"] if args.wandb else []),
        logging_nan_inf_filter=False,  # TailoredTrainer.training_step filters, without a wait per step
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False)


def deepspeed_config(args) -> dict:
    """The --deepspeed file, with the flags that would otherwise be silently ignored applied: a
    --max_grad_norm > 0 becomes its `gradient_clipping` when the file has none (the shipped file has
    none: the original did not clip), and a --lr_scheduler_type other than warmup_log replaces the
    file's scheduler (the shipped file's WarmupLR is warmup_log)."""
    try:
        config = read_json(args.deepspeed, "--deepspeed config")
    except UserError as err:
        raise UserError(f"--deepspeed: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed: {args.deepspeed}: expected a JSON object")
    if args.max_grad_norm > 0 and "gradient_clipping" not in config:
        config["gradient_clipping"] = args.max_grad_norm
    if args.lr_scheduler_type != WARMUP_LOG:
        config.pop("scheduler", None)
    return config


# ---------------------------------------------------------------- throughput switches

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


def set_up_model(model: torch.nn.Module, args) -> torch.nn.Module:
    """Checkpointing, LoRA, then compilation (of the layers LoRA has changed), in that order."""
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    if args.lora_r > 0:
        model = add_lora(model, args)
    if args.torch_compile:
        compile_layers(model)
        if args.gradient_checkpointing and args.contrastive and not hf_compat.checkpoint_inside_compiled_layer():
            print(f"note: --torch_compile with --gradient_checkpointing: transformers {hf_compat.installed()} replays "
                  "checkpointed layers outside their compiled graphs, so the shared step compiles one graph per layer "
                  "and may hit dynamo's recompile limit (the pinned transformers does not)")
    return model


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile each decoder layer (transformers' regional compilation). All layers share their graphs,
    one per kind of forward the step runs, however deep the model: the step hands each attention module its
    own cache layer (shared_step.own_layers), so no graph depends on a layer's index. Dynamo's recompile
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


def sample_teacher_rows(data, keep: str, seed: int) -> None:
    """--teacher_data_random: P keeps each row with probability P (the original's); 'one' keeps one
    seeded pick per question. Either way the dropped rationales still serve as positives."""
    rng = random.Random(seed)
    if keep == "one":
        by_question: dict[int, list] = {}
        for row in data.rows:
            by_question.setdefault(row.qid, []).append(row)
        data.rows = [rng.choice(rows) for _, rows in sorted(by_question.items())]
    elif float(keep) < 1.0:
        data.rows = [row for row in data.rows if rng.random() < float(keep)]
    else:
        return
    data.counts["rows_after_teacher_data_random"] = len(data.rows)
    if not data.rows:
        raise UserError(f"--teacher_data_random {keep} kept no training row")


def run_training(args) -> dict:
    """Build data, model and trainer from TrainArguments, train, save `<output_dir>/final`; returns a summary."""
    started = time.time()
    loss_cfg = LossConfig.from_args(args)  # checks the loss flags before anything is loaded
    changed = differing_defaults(args, ORIGINAL_TRAIN_DEFAULTS, sys.argv[1:])
    if changed and distributed.is_main():
        print("note: defaults that differ from the original's: " + ", ".join(changed))
    # every input is checked before anything slow (DeepSpeed's setup, data, weights) starts
    ds_config = deepspeed_config(args) if args.deepspeed else None
    if ds_config is not None:
        check_lora_deepspeed(args, ds_config)
    check_switches(args, ds_config)
    task = get_task(args.task)
    resume_from = check_resume(args)
    output_dir = args.output_dir or (str(Path(resume_from).parent) if resume_from else default_output_dir(args))
    check_output_dir(output_dir, "--output_dir")
    model_path = args.model_path
    flag = "--checkpoint" if args.checkpoint else "--load"
    check_model_path(model_path, flag, args.allow_pickle)
    for name in ("teacher_data", "cl_pos_path", "cl_neg_path"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise UserError(f"--{name}: {path} not found")
    if args.deepspeed:
        distributed.ensure_single_process_env()
        distributed.clear_stale_build_locks()  # its CPU optimizer op is built (or checked) under such a lock
        import deepspeed  # its own comm layer must know every rank before zero.Init sizes the batch

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    set_seed(args.seed)

    train = load_split(task.name, args.train_on, args.data_dir, DEBUG_TRAIN if args.debug else None, args.valid_size)
    rationale = args.teacher_data is not None
    demos = load_demos(task, rationale, args.fewshot_file, train, args.seed) if args.fewshot else ""
    tokenizer = load_tokenizer(tokenizer_source(model_path, args.load if args.checkpoint else None), args.trust_remote_code, flag)
    config = load_config(model_path, flag, args.trust_remote_code)
    max_length = min(args.max_length, max_positions(config))
    data = build_train_data(task, train, tokenizer, teacher_data=args.teacher_data, demos=demos,
                            max_length=max_length, cl_pos_path=args.cl_pos_path if args.contrastive else None,
                            cl_neg_path=args.cl_neg_path if args.contrastive else None, cl_pos_num=args.cl_pos_num,
                            cl_neg_num=args.cl_neg_num, seed=args.seed, cl_neg_form=args.cl_neg_form,
                            answer_filter=args.answer_filter)
    sample_teacher_rows(data, args.teacher_data_random, args.seed)
    if distributed.is_main():
        print("training data: " + ", ".join(f"{k} {v}" for k, v in data.counts.items()))
        world = distributed.world_size()
        print(f"optimisation: learning rate {args.learning_rate:g} ({args.lr_scheduler_type}, {args.warmup_steps} warm-up "
              f"steps), batch {args.per_device_train_batch_size} per process x {world} process(es) x "
              f"{args.gradient_accumulation_steps} accumulation = {args.per_device_train_batch_size * world * args.gradient_accumulation_steps}"
              f" rows per step, gradient clipping {args.max_grad_norm or 'off'}")
    eval_setup = None
    if args.do_eval:
        eval_split = args.eval_split or ("validation" if has_validation(task.name, args.valid_size) else args.test_on)
        if args.eval_split is None and eval_split == args.test_on and distributed.is_main():
            print(f"note: task {task.name} has no validation split (--valid_size 0): --do_eval and --save_best read "
                  f"{args.test_on}, as the original did; pass --valid_size N to select on held-out train items instead")
        eval_limit = min(args.eval_limit or DEBUG_EVAL, DEBUG_EVAL) if args.debug else args.eval_limit
        eval_setup = dict(task=task, examples=load_split(task.name, eval_split, args.data_dir, eval_limit,
                                                         args.valid_size),
                          demos=demos, rationale=rationale,
                          sampling=SamplingConfig(max_new_tokens=task.max_new_tokens,
                                                  batch_size=args.per_device_eval_batch_size))

    bf16, fp16 = precision.autocast_precision(args)
    training_args = training_arguments(args, output_dir, bf16, fp16, ds_config)  # before the model: ZeRO-3 partitions at load
    model = load_weights(model_path, flag, args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **model_kwargs(args, config))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = set_up_model(model, args)
    cast = precision.ensure_fp32_trainable(model, args)
    if distributed.is_main():
        print(precision.describe(model, args, precision.checkpoint_dtype(config), bf16, fp16, ds_config)
              + (f" ({cast} trainable tensors cast to float32)" if cast else ""))
        print(precision.memory_plan(model, args, distributed.world_size(), ds_config).line())
        print(hf_compat.version_line())
    multiple = args.pad_to_multiple_of or (64 if args.torch_compile else 0)
    collator = TailoredCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, contrastive=args.contrastive)

    trainer = TailoredTrainer(
        model=model, args=training_args, train_dataset=TailoredDataset(data, seed=args.seed),
        eval_dataset=eval_setup["examples"] if eval_setup else None,  # read by our evaluate()
        data_collator=BucketedCollator(collator, multiple) if multiple > 1 else collator,
        optimizer_cls_and_kwargs=precision.master_weight_optimizer(training_args) if args.bf16_weights else None,
        processing_class=tokenizer, loss_cfg=loss_cfg, merge_losses=args.merge_losses, eval_setup=eval_setup,
        lr_schedule=args.lr_scheduler_type, first_eval=args.do_first_eval,
        callbacks=[SaveExtrasCallback(as_dict(args), training_args.deepspeed, args.save_best)])
    resume = resume_from
    if args.resume_requested and resume is None:
        # trainer_state.json is written last: a checkpoint without it was cut short by the interruption
        checkpoints = sorted((p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                             key=lambda p: int(p.name.split("-")[1]))
        if checkpoints:
            resume = str(checkpoints[-1])
        elif distributed.is_main():
            print(f"--resume: no checkpoint in {output_dir} yet; starting from the beginning")
    if resume:
        if distributed.is_main():
            print(f"resuming from {resume}")
        trainer.loss_before_resume = LossTotalCallback.read(Path(resume)) or trainer.loss_before_resume
    result = trainer.train(resume_from_checkpoint=resume)
    steps_before, loss_before = trainer.loss_before_resume
    steps_now = trainer.state.global_step - steps_before
    train_loss = (loss_before + result.training_loss * steps_now) / max(trainer.state.global_step, 1)

    final = Path(output_dir) / "final"
    if args.lora_r > 0:
        save_lora(trainer, final, Path(output_dir) / ADAPTER_DIR)
    else:
        trainer.save_model(str(final))  # gathers ZeRO-3 shards into one safetensors file
    summary = {"output_dir": output_dir, "final_checkpoint": str(final), "steps": trainer.state.global_step,
               "train_loss": train_loss, "seconds": round(time.time() - started, 1),
               "data": data.counts, "eval": trainer.eval_history}
    if trainer.is_world_process_zero():
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; run_args.json says the same in JSON
        atomic_write_json(final / "run_args.json", redact(as_dict(args)))
        atomic_write_json(Path(output_dir) / "train_summary.json", summary)
        print_summary(summary)
    distributed.barrier()
    return summary


def print_summary(summary: dict) -> None:
    print(f"\ntrained {summary['steps']} steps in {summary['seconds']:.0f}s, mean loss {summary['train_loss']:.4f}")
    for entry in summary["eval"]:
        print(f"  epoch {entry['epoch']:.0f}: accuracy {entry['acc']:.4f} (strict {entry['strict_acc']:.4f})")
    print(f"checkpoint: {summary['final_checkpoint']}  (python infer.py --checkpoint {summary['final_checkpoint']} --rationale)")
