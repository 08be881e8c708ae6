"""The HF `Trainer` subclass behind run_trainer.py: tailored losses, question-unique batches,
accuracy by generation at each epoch, best-K checkpoints, redacted configs beside each save.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

import distributed
from common import atomic_write_json, read_json, redact
from generation import evaluate
from losses import LossConfig, clip_self_reflection
from shared_step import compute_tailored_loss
from train_batches import UniqueQuestionBatchSampler

METRICS = ("lm_loss", "cl_loss", "triplet_fraction")
WARMUP_LOG = "warmup_log"  # --lr_scheduler_type of the original's DeepSpeed WarmupLR (warmup_log_factor)


class TailoredTrainer(Trainer):
    """`eval_setup`: dict(task, examples, demos, rationale, sampling) for accuracy by generation.
    `reference_model`: the frozen starting model of a loss that `needs_reference` (kept on the device, never trained)."""

    def __init__(self, *args, loss_cfg: LossConfig, merge_losses: bool = True, eval_setup: dict | None = None,
                 lr_schedule: str = WARMUP_LOG, first_eval: bool = False, reference_model: torch.nn.Module | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_model = None if reference_model is None else \
            reference_model.to(self.args.device).eval().requires_grad_(False)
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
        loss, metrics = compute_tailored_loss(model, inputs, self.loss_cfg, self.reference_model)
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
                loss, metrics = compute_tailored_loss(model, inputs, cfg, self.reference_model)
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
