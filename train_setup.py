"""One training run from its flags: the body of run_trainer.py, as run_clm.py's main() is of its script.
Every input is checked before anything slow starts, then data, model, trainer, training, the final save.
A module rather than the script itself: the script parses its flags and sets the devices before torch is
imported (distributed.script_main imports this module only then).
"""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import TrainingArguments

import distributed
import hf_compat
import precision
from args import ORIGINAL_TRAIN_DEFAULTS
from common import (DiskFull, UserError, atomic_write_json, check_output_dir, folder_lock, is_disk_full, read_json,
                    redact, set_seed)
from flags import as_dict, differing_defaults
from generation import SamplingConfig
from hf_internals import enable_checkpointing
from lora import ADAPTER_DIR, add_lora, check_lora_deepspeed, save_lora
from losses import LossConfig
from model_loading import (check_model_path, load_config, load_tokenizer, load_weights, max_positions,
                           tokenizer_source)
from speed import BucketedCollator, check_switches, compile_layers, model_kwargs
from tasks import get_task, has_validation, load_demos, load_split
from train_batches import TailoredCollator, TailoredDataset, check_batch_fits
from train_data import build_train_data
from trainer import WARMUP_LOG, LossTotalCallback, SaveExtrasCallback, TailoredTrainer

DEBUG_TRAIN, DEBUG_EVAL = 97, 33  # --debug sizes, the original's


def run_training(args) -> dict:
    """Build data, model and trainer from TrainArguments, train, save `<output_dir>/final`; returns a summary."""
    started = time.time()
    loss_cfg = LossConfig.from_args(args)  # checks the loss flags before anything is loaded
    if loss_cfg.needs_reference and args.deepspeed:
        raise UserError(f"--cl_loss {args.cl_loss} needs a frozen reference model, which is not supported with --deepspeed")
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
    # before the weights load: the batch sampler would say so only then
    check_batch_fits(args.per_device_train_batch_size, len({row.qid for row in data.rows}), "--train_bsz")
    # one writer per output folder, from here on (the kernel drops the lock when this process ends, however it ends)
    with folder_lock(output_dir, "training run", enabled=distributed.is_main()):
        if distributed.is_main():
            print("training data: " + ", ".join(f"{k} {v}" for k, v in data.counts.items()))
            world = distributed.world_size()
            print(f"optimisation: learning rate {args.learning_rate:g} ({args.lr_scheduler_type}, {args.warmup_steps} warm-up "
                  f"steps), batch {args.per_device_train_batch_size} per process x {world} process(es) x "
                  f"{args.gradient_accumulation_steps} accumulation = "
                  f"{args.per_device_train_batch_size * world * args.gradient_accumulation_steps} rows per step, "
                  f"gradient clipping {args.max_grad_norm or 'off'}")
        eval_setup = evaluation_setup(args, task, demos, rationale)

        bf16, fp16 = precision.autocast_precision(args)
        training_args = training_arguments(args, output_dir, bf16, fp16, ds_config)  # before the model: ZeRO-3 partitions at load
        model = load_weights(model_path, flag, args.allow_pickle, trust_remote_code=args.trust_remote_code,
                             **model_kwargs(args, config))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        reference = copy.deepcopy(model) if loss_cfg.needs_reference else None  # the starting weights, before LoRA
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
            lr_schedule=args.lr_scheduler_type, first_eval=args.do_first_eval, reference_model=reference,
            callbacks=[SaveExtrasCallback(as_dict(args), training_args.deepspeed, args.save_best)])
        resume = checkpoint_to_resume(args, output_dir, resume_from)
        if resume:
            trainer.loss_before_resume = LossTotalCallback.read(Path(resume)) or trainer.loss_before_resume
        with disk_full_names(output_dir):
            result = trainer.train(resume_from_checkpoint=resume)
        steps_before, loss_before = trainer.loss_before_resume
        steps_now = trainer.state.global_step - steps_before
        train_loss = (loss_before + result.training_loss * steps_now) / max(trainer.state.global_step, 1)

        final = Path(output_dir) / "final"
        with disk_full_names(final):  # run_args.json, written last, is what says `final` is complete
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


@contextmanager
def disk_full_names(folder: str | Path) -> Iterator[None]:
    """A full disk while the Trainer saves (safetensors and torch.save word it in their own errors) is one line
    naming the folder. The checkpoint cut short has no trainer_state.json, written last, so --resume skips it."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise DiskFull(folder, "while saving a checkpoint") from None
        raise


def checkpoint_damage(folder: Path) -> str | None:
    """Why training cannot continue from this checkpoint folder, or None when it can."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json: the save was cut short"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "its trainer_state.json is empty or not JSON"
    weights = list(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("global_step*")):
        return "no weights in it (*.safetensors or DeepSpeed's global_step* folder)"
    for file in weights:
        try:
            with safe_open(file, "pt"):  # reads the header only
                pass
        except Exception:  # safetensors raises its own error types for a truncated or garbled file
            return f"its {file.name} cannot be read"
    return None


def check_resume(args) -> str | None:
    """--resume PATH: the checkpoint folder to continue from (checked here); None for yes/no."""
    path = args.resume_path
    if path is None:
        return None
    if not Path(path).is_dir():
        raise UserError(f"--resume: {path} is not a folder (expected a checkpoint-<step> folder, or yes/no)")
    damage = checkpoint_damage(Path(path))
    if damage:
        raise UserError(f"--resume: cannot continue from {path}: {damage}")
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


def evaluation_setup(args, task, demos: str, rationale: bool) -> dict | None:
    """--do_eval: what TailoredTrainer.evaluate needs for accuracy by generation at each epoch; None without it."""
    if not args.do_eval:
        return None
    eval_split = args.eval_split or ("validation" if has_validation(task.name, args.valid_size) else args.test_on)
    if args.eval_split is None and eval_split == args.test_on and distributed.is_main():
        print(f"note: task {task.name} has no validation split (--valid_size 0): --do_eval and --save_best read "
              f"{args.test_on}, as the original did; pass --valid_size N to select on held-out train items instead")
    eval_limit = min(args.eval_limit or DEBUG_EVAL, DEBUG_EVAL) if args.debug else args.eval_limit
    return dict(task=task, examples=load_split(task.name, eval_split, args.data_dir, eval_limit, args.valid_size),
                demos=demos, rationale=rationale,
                sampling=SamplingConfig(max_new_tokens=task.max_new_tokens, batch_size=args.per_device_eval_batch_size))


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


def checkpoint_to_resume(args, output_dir: str, resume_from: str | None) -> str | None:
    """--resume PATH: that checkpoint (check_resume); --resume yes: the latest complete one in `output_dir`,
    if any; else None (a fresh start)."""
    resume = resume_from
    if args.resume_requested and resume is None:
        checkpoints = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                             key=lambda p: int(p.name.split("-")[1]), reverse=True)
        for checkpoint in checkpoints:  # the newest that is whole: a kill or a full disk may have damaged the last
            damage = checkpoint_damage(checkpoint)
            if damage is None:
                resume = str(checkpoint)
                break
            if distributed.is_main():
                print(f"note: --resume: skipping {checkpoint} ({damage})")
        if resume is None and distributed.is_main():
            print(f"--resume: no usable checkpoint in {output_dir} yet; starting from the beginning")
    if resume and distributed.is_main():
        print(f"resuming from {resume}")
    return resume


def print_summary(summary: dict) -> None:
    print(f"\ntrained {summary['steps']} steps in {summary['seconds']:.0f}s, mean loss {summary['train_loss']:.4f}")
    for entry in summary["eval"]:
        print(f"  epoch {entry['epoch']:.0f}: accuracy {entry['acc']:.4f} (strict {entry['strict_acc']:.4f})")
    print(f"checkpoint: {summary['final_checkpoint']}  (python infer.py --checkpoint {summary['final_checkpoint']} --rationale)")
