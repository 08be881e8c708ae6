"""Command-line arguments of every script, as dataclasses parsed by HfArgumentParser.

Boolean flags accept both the bare form (`--fewshot`) and a value (`--fewshot yes|no`), as the
original README uses both.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Literal, get_args, get_type_hints

from transformers import HfArgumentParser

from arms import DRIVER_ARMS, EVIDENCE_ARMS, check_arms
from common import UserError


class OneLineParser(HfArgumentParser):
    """argparse's own errors (unknown flag, bad choice, not a number) as the one `error:` line every
    other bad input gets, instead of the usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def parse(cls, argv: list[str] | None = None):
    parser = OneLineParser(cls)
    try:
        (parsed,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # raised by __post_init__ checks
        raise UserError(str(err)) from None
    check_bounds(parsed)
    return parsed


def bounds_of(cls) -> dict[str, str]:
    """The BOUNDS of the class and of every group it is composed of (each group bounds its own fields)."""
    bounds: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        bounds |= vars(klass).get("BOUNDS", {})
    return bounds


def check_bounds(args) -> None:
    """Each field named in BOUNDS ({name: ">=1" | ">0" | ...}) holds a finite number in range
    (None is left alone: it means "not set"). Kept as a table so every script rejects nonsense the same way."""
    by_name = {f.name: f for f in fields(args)}
    for name, bound in bounds_of(type(args)).items():
        value = getattr(args, name)
        if value is None:
            continue
        op, limit = bound[:2] if bound[1] == "=" else bound[:1], float(bound.lstrip("<>="))
        ok = isinstance(value, (int, float)) and math.isfinite(value) and \
            {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
        if not ok:
            flag = "/".join(flags_of(by_name[name]))
            raise UserError(f"{flag} must be a number {op} {bound.lstrip('<>=')}, got {value}")


def choices_of(cls, name: str) -> tuple[str, ...] | None:
    """The values a field typed `Literal[...]` allows (argparse offers them as choices), else None."""
    hint = get_type_hints(cls)[name]
    return get_args(hint) if getattr(hint, "__origin__", None) is Literal else None


def check_choices(args) -> None:
    """Literal-typed fields hold one of their values: argparse checks flags, this checks a dataclass built
    directly (the round driver builds each stage's, to_argv)."""
    for f in fields(args):
        allowed = choices_of(type(args), f.name)
        if allowed and getattr(args, f.name) not in allowed:
            raise UserError(f"--{f.name} must be one of {', '.join(allowed)}, got {getattr(args, f.name)!r}")


def script_defaults(**defaults):
    """Class decorator in place of @dataclass: this script's own defaults for flags declared once in the groups
    it is composed of, which keep their type, bounds and help. A value (default, note) adds why to the help."""
    def build(cls):
        declared = {f.name: f for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__") for f in fields(base)}
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            default, note = value if isinstance(value, tuple) else (value, "")
            inherited = declared[name]
            metadata = dict(inherited.metadata)
            if note:
                metadata["help"] = f"{metadata.get('help', '')} {note}".strip()
            setattr(cls, name, field(default=default, metadata=metadata))
            annotations[name] = inherited.type
        cls.__annotations__ = annotations
        return dataclass(cls)
    return build


def as_dict(args) -> dict:
    return asdict(args)


def to_argv(cls, **values) -> list[str]:
    """Command-line flags that parse back into `cls(**values)`. Building `cls` here checks every name
    and value before anything runs; each flag is written under its first alias (the original's short
    flag) where it has one; None values are left out."""
    cls(**values)
    argv = []
    for f in fields(cls):
        value = values.get(f.name)
        if value is None:
            continue
        flag = (f.metadata.get("aliases") or [f"--{f.name}"])[0]
        argv += [flag, ("yes" if value else "no") if isinstance(value, bool) else str(value)]
    return argv


def flags_of(f) -> list[str]:
    return [f"--{f.name}", *f.metadata.get("aliases", [])]


def differing_defaults(args, original: dict, argv: list[str]) -> list[str]:
    """'--flag ours (original: theirs)' for every field in `original` left at our default (not on the
    command line `argv`) where the original's default was different: printed so no one is surprised."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    notes = []
    for f in fields(args):
        if f.name in original and not given & set(flags_of(f)) and getattr(args, f.name) != original[f.name]:
            show = lambda v: ("yes" if v else "no") if isinstance(v, bool) else v  # noqa: E731
            notes.append(f"{flags_of(f)[-1]} {show(getattr(args, f.name))} (original: {show(original[f.name])})")
    return notes


def device_list(device: str) -> list[str]:
    """'0,1,2' -> ['0','1','2']; 'cpu' or '' -> [] (one process, default device)."""
    if device.strip().lower() in ("", "cpu", "auto"):
        return []
    items = [d.strip() for d in device.split(",") if d.strip()]
    if not all(d.isdigit() for d in items):
        raise UserError(f"--device: expected 'cpu' or comma-separated GPU ids like 0,1,2, got {device!r}")
    return items


def optimizer_names() -> set[str]:
    from transformers.training_args import OptimizerNames  # imports torch: only when --optim is given

    return {o.value for o in OptimizerNames}


def check_task(name: str) -> None:
    """--task names a task of tasks.TASKS: checked with the flags, before any model code is imported."""
    from tasks import get_task

    get_task(name)


@dataclass
class TaskArguments:
    """Which task and data: every script that reads a split."""
    BOUNDS: ClassVar[dict] = {"valid_size": ">=0"}
    task: str = field(default="wordmath", metadata={"help": "Task name: gsm8k, svamp, multiarith, cqa, sqa, wordmath, gsm_symbolic."})
    data_dir: str = field(default="localdataset", metadata={"help": "Local datasets: <data_dir>/<task>/<split>.{jsonl,json,parquet} or a save_to_disk folder."})
    valid_size: int = field(default=0, metadata={"help": "Tasks without a validation split (the hub ones): hold out N train items "
                                                        "(a fixed draw) as 'validation', which train then leaves out. 0: train whole, as the original."})
    seed: int = field(default=42, metadata={"help": "Random seed (demo choice, data order, sampling, the offline teacher's phrasing)."})


@dataclass
class DataArguments(TaskArguments):
    """What the student is asked: task, splits, prompt format. Shared by every model-running script."""
    fewshot: bool = field(default=False, metadata={"help": "Prepend few-shot demos to every prompt."})
    fewshot_file: str | None = field(default=None, metadata={"help": "Demos file (.txt blocks separated by blank lines, or .json/.jsonl records)."})
    rationale: bool = field(default=False, metadata={"help": "Rationale mode (Reasoning: ... Answer: ...) instead of answer-only."})


@dataclass
class DeviceArguments:
    """Where models run and in what precision: every stage that runs one (and the round driver, for all of them)."""
    device: str = field(default="cpu", metadata={"help": "'cpu' or GPU ids '0,1,...'; several ids run one process per id."})
    bf16: bool = field(default=False, metadata={"help": "Load weights in bfloat16."})


@dataclass
class ModelArguments(DeviceArguments):
    """Which model, and how it may be loaded."""
    load: str = field(default="checkpoints/wordmath-student",
                      metadata={"help": "Base model: a hub name (e.g. EleutherAI/gpt-j-6B) or a local folder."})
    checkpoint: str | None = field(default=None, metadata={"help": "Trained checkpoint folder; overrides --load when given."})
    fp16: bool = field(default=False, metadata={"help": "Load weights in float16 (GPU)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off by default)."})
    allow_pickle: bool = field(default=False, metadata={"help": "Load a folder whose weights are a pickle (pytorch_model.bin, as the original "
                                                               "saved them). Unpickling can run code from the file: only for files you trust."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the `deepspeed` launcher; the rank is read from the environment."})

    @property
    def model_path(self) -> str:
        return self.checkpoint or self.load


# ---------------------------------------------------------------- generation (infer.py, infer_student_wrong.py)
@dataclass
class GenerationArguments(ModelArguments, DataArguments):
    """What evaluation and the exam share. The original's defaults (its InferArgs): rationale prompts, float16
    weights on a GPU."""
    BOUNDS: ClassVar[dict] = {"batch": ">=1", "max_new_tokens": ">=1", "limit": ">=0"}
    rationale: bool = field(default=True, metadata={"help": "Rationale mode (Reasoning: ... Answer: ...) instead of answer-only "
                                                            "(default yes, as the original)."})
    fp16: bool | None = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "Load weights in float16. Unset: float16 on a GPU, as the original; float32 on a CPU, bfloat16 with --bf16 (a note says so).")})
    test_on: str = field(default="test", metadata={"help": "Split to run on: test, train, validation."})
    batch: int = field(default=32, metadata={"help": "Prompts per generation batch per process (in the exam, each sampled "
                                                     "--num_return_sequences times)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "New tokens per answer. Default: the task's value (SPEC §6)."})
    limit: int | None = field(default=None, metadata={"aliases": ["--sample_num"], "help": "Only the first N items "
                                                                                          "(--sample_num: the original's name)."})
    decode_eos_token: bool = field(default=True, metadata={"help": "yes: no special token (eos, pad) may be the first generated "
                                                                   "token, as the original's default; no: any token. The original's "
                                                                   "exam ignored the flag and sampled any token: no restores that."})
    prefix_cache: bool = field(default=True, metadata={"help": "yes: the tokens every prompt opens with (the few-shot demos) are run "
                                                               "once and their KV cache reused for every batch; no: each row prefills "
                                                               "its whole prompt. Same outputs, for timing comparisons."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <checkpoint>/eval_<split> (infer.py), "
                                                                   "<checkpoint>/exam_<split>_<note> (infer_student_wrong.py)."})
    note: str = field(default="", metadata={"help": "Free text stored in the output; names the exam's default output folder."})

    def __post_init__(self):
        check_task(self.task)


@dataclass
class InferArguments(GenerationArguments):
    hint: bool = field(default=False, metadata={"help": "STaR rationalisation: evaluate only the questions --hint_filter_path marks wrong, "
                                                        "each prompt block with a line naming its answer. Needs --fewshot and --rationale."})
    hint_filter_path: str | None = field(default=None, metadata={"help": "With --hint: an Acc*.json of an earlier infer.py run on the same split."})

    def __post_init__(self):
        super().__post_init__()
        if self.hint and not self.hint_filter_path:
            raise UserError("--hint needs --hint_filter_path (an Acc*.json whose wrong questions get hints)")
        if self.hint and not (self.fewshot and self.rationale):
            raise UserError("--hint needs --fewshot and --rationale: the hints go into the few-shot rationale prompt")
        if self.hint_filter_path and not self.hint:
            raise UserError("--hint_filter_path is read only with --hint")


@dataclass
class SamplesArguments:
    """Samples per exam question (also the round driver's flag, passed on by name)."""
    BOUNDS: ClassVar[dict] = {"num_return_sequences": ">=1"}
    num_return_sequences: int = field(default=4, metadata={"help": "Samples per question (the original's fixed 4)."})


@script_defaults(test_on="train", max_new_tokens=128)
class ExamArguments(GenerationArguments, SamplesArguments):
    # not shared with the round driver: a `temperature` there would also reach the teacher's flag of that name
    BOUNDS: ClassVar[dict] = {"temperature": ">0", "top_k": ">=0"}
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling."})


# ---------------------------------------------------------------- training (run_trainer.py)
# The original's defaults where ours differ on purpose (its README passes every one of them explicitly).
ORIGINAL_TRAIN_DEFAULTS = {"merge_losses": False, "weight_decay": 0.1, "learning_rate": 1e-6, "per_device_eval_batch_size": 4}
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
MleMode = Literal["weight", "hf", "nograd", "no"]
ReprMode = Literal["last", "pool"]
AnchorMode = Literal["detached", "full"]
LmLossImpl = Literal["auto", "logits", "chunked", "liger"]
NegForm = Literal["original", "gold", "own"]


@dataclass
class LoraArguments:
    """LoRA flags, shared by run_trainer.py and the round driver (which passes them on by name)."""
    BOUNDS: ClassVar[dict] = {"lora_r": ">=0", "lora_alpha": ">0", "lora_dropout": ">=0"}
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (peft): R > 0 trains low-rank adapters on --lora_targets only; <output_dir>/final "
                                                     "is the merged model, <output_dir>/final_adapter the adapter. 0: full fine-tuning."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_targets: str = field(default="auto", metadata={"help": "Comma list of module names given adapters, or auto: the attention "
                                                                "projections found in the model (q_proj,k_proj,v_proj,o_proj for Llama/Qwen/Mistral; "
                                                                "c_attn,attn.c_proj for GPT-2), else every linear layer but the LM head."})

    def check_lora(self) -> None:
        """The checks that BOUNDS cannot say (dropout below 1, a target list)."""
        if isinstance(self.lora_dropout, (int, float)) and self.lora_dropout >= 1:
            raise UserError(f"--lora_dropout must be a number < 1, got {self.lora_dropout}")
        names = [name.strip() for name in self.lora_targets.split(",")]
        if not all(names):
            raise UserError(f"--lora_targets: expected auto or a comma list of module names, got {self.lora_targets!r}")


@dataclass
class LossArguments:
    """The training loss: these fields are `losses.LossConfig`'s (which checks them where they are used)."""
    BOUNDS: ClassVar[dict] = {"mle_w": ">=0", "cl_p": ">=0", "cl_ratio": ">=0", "cl_beta": ">0", "cl_gamma": ">=0",
                              "lm_loss_chunk": ">=1"}
    mle: MleMode = field(default="weight", metadata={"help": "LM loss: weight (prompt tokens x mle_w), hf (plain mean), nograd "
                                                             "(continuation only), no."})
    mle_w: float = field(default=0.1, metadata={"help": "Weight of prompt tokens in --mle weight."})
    contrastive: bool = field(default=False, metadata={"help": "Add the self-reflection triplet loss."})
    cl_loss: str = field(default="triplet", metadata={"help": "Self-reflection loss (losses.CONTRAST_LOSSES): triplet, the original's; "
                                                              "simpo or orpo: a reference-free preference of the teacher's rationale over "
                                                              "the student's mistake, on their length-normalised log-probs; "
                                                              "dpo: DPO against the frozen starting model, on summed log-probs."})
    cl_ratio: float = field(default=0.5, metadata={"help": "Weight of the self-reflection loss."})
    cl_p: float = field(default=1.0, metadata={"help": "Triplet margin."})
    cl_repr: ReprMode = field(default="last", metadata={"help": "Sequence representation: last (last token) or pool (mean)."})
    cl_anchor: AnchorMode = field(default="detached", metadata={"help": "detached: the anchor is re-read on the no-grad prompt, as the "
                                                                        "original; full: read from the LM forward (cheaper; its triplet "
                                                                        "gradient also reaches the prompt)."})
    cl_clip: bool = field(default=False, metadata={"help": "Zero the self-reflection loss of a step when it is below the LM loss or "
                                                           "below 0.01 (the original's flag)."})
    lm_loss_impl: LmLossImpl = field(default="auto", metadata={"help": "How the LM loss reaches the vocabulary (same value): logits "
                                                                       "(the model's full logits), chunked (the output head applied "
                                                                       "--lm_loss_chunk positions at a time, recomputed in backward), "
                                                                       "liger (liger-kernel's fused linear cross-entropy, if installed), "
                                                                       "or auto: chunked on a GPU, logits on a CPU."})
    lm_loss_chunk: int = field(default=4096, metadata={"help": "--lm_loss_impl chunked: target positions per chunk."})
    cl_beta: float = field(default=2.0, metadata={"help": "--cl_loss simpo or dpo: beta, the scale of the log-prob difference (the SimPO paper's 2.0)."})
    cl_gamma: float = field(default=1.0, metadata={"help": "--cl_loss simpo: gamma, the target margin (the SimPO paper's gamma / beta = 0.5)."})


@dataclass
class TrainRunArguments:
    """How a training run goes: length, schedule, negatives, DeepSpeed (run_trainer.py, and the round driver for every round)."""
    BOUNDS: ClassVar[dict] = {"num_train_epochs": ">=0", "per_device_train_batch_size": ">=1", "learning_rate": ">0",
                              "warmup_steps": ">=0", "max_grad_norm": ">=0"}
    num_train_epochs: float = field(default=10, metadata={"aliases": ["--epoch"], "help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides --epoch when > 0)."})
    per_device_train_batch_size: int = field(default=2, metadata={"aliases": ["--train_bsz"], "help": "Training batch size per process."})
    learning_rate: float = field(default=7e-6, metadata={"aliases": ["--lr"], "help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="warmup_log", metadata={"help": "warmup_log: the original's (DeepSpeed WarmupLR's default: from 0 to the "
                                                                           "peak as log(step+1)/log(warmup_steps), then constant); or a transformers "
                                                                           "scheduler name, e.g. constant_with_warmup (linear warm-up)."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: no clipping, as the original's DeepSpeed config."})
    cl_neg_form: NegForm = field(default="original", metadata={"help": "Negative continuations: original = the student's whole wrong text, "
                                                                       "its answer line folded in, + the GOLD answer line (the original's "
                                                                       "preprocessing); gold = its reasoning + the gold answer line; own = "
                                                                       "its reasoning + its own answer line."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config, e.g. ds_stage3_config.json (ZeRO-3)."})


@dataclass
class TrainArguments(ModelArguments, DataArguments, LoraArguments, LossArguments, TrainRunArguments):
    """Flags of the original README's training command, with its defaults (SPEC §5).

    Fields named like a `transformers.TrainingArguments` field are handed to it as they are
    (train_setup.training_arguments); the original's short flags (--lr, --epoch, --train_bsz, ...) are
    aliases of those names."""
    BOUNDS: ClassVar[dict] = {
        "per_device_eval_batch_size": ">=1", "gradient_accumulation_steps": ">=1", "weight_decay": ">=0", "max_length": ">=2",
        "cl_pos_num": ">=1", "cl_neg_num": ">=1", "eval_limit": ">=0", "save_best": ">=0", "save_steps": ">0",
        "logging_steps": ">=1", "world_size": ">=0", "rank_offset": ">=0", "pad_to_multiple_of": ">=0"}
    teacher_data: str | None = field(default=None, metadata={"help": "Teacher rationales {question: [rationale, ...]}; without it: answer-only training on gold answers."})
    teacher_data_random: str = field(default="1.0", metadata={"help": "P in [0, 1]: keep each teacher rationale with probability P (the original's; "
                                                                     "1.0 keeps all), or 'one': one seeded pick per question (the others stay positives)."})
    answer_filter: bool = field(default=False, metadata={"help": "Re-check answers in the files: drop teacher rationales and positives whose final "
                                                               "answer is not gold, negatives whose answer is. Off: the files are used as given, as the original."})
    train_on: str = field(default="train", metadata={"help": "Split to train on."})
    test_on: str = field(default="test", metadata={"help": "Split --do_eval falls back to when the task has no validation split."})
    per_device_eval_batch_size: int = field(default=16, metadata={"aliases": ["--eval_bsz"], "help": "Generation batch size of the per-epoch evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"aliases": ["--grad_accum"], "help": "Gradient accumulation steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_length: int = field(default=1024, metadata={"help": "Longest training sequence in tokens (prompt truncated from the left)."})
    cl_pos_path: str | None = field(default=None, metadata={"help": "Positives: teacher rationales {question: [...]}."})
    cl_neg_path: str | None = field(default=None, metadata={"help": "Negatives: the student's wrong rationales {question: [...]}."})
    cl_pos_num: int = field(default=10, metadata={"help": "At most this many positives per question."})
    cl_neg_num: int = field(default=4, metadata={"help": "At most this many negatives per question."})
    merge_losses: bool = field(default=True, metadata={"help": "One backward pass on LM + triplet loss (no: two passes, lower peak memory)."})
    do_eval: bool = field(default=False, metadata={"help": "Accuracy by generation after every epoch."})
    do_first_eval: bool = field(default=False, metadata={"help": "With --do_eval: also evaluate the starting model before the first step."})
    eval_split: str | None = field(default=None, metadata={"aliases": ["--valid_on"], "help": "Split evaluated by --do_eval and ranked by --save_best. Default: validation "
                                                                   "where the task has one (embedded tasks, or --valid_size N), else test as the original (with a note)."})
    eval_limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    save_best: int = field(default=0, metadata={"help": "K > 0: keep only the K most accurate epoch checkpoints (needs --do_eval); 0: keep all."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to write checkpoint-<step>/: epoch, steps (with --save_steps) or no."})
    save_steps: float = field(default=500, metadata={"help": "With --save_strategy steps: every N steps."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: checkpoints/student_train/<task>[_<note>]."})
    resume: str = field(default="no", metadata={"help": "yes: continue from the last checkpoint in --output_dir; PATH: from that checkpoint "
                                                        "folder (its parent becomes --output_dir, as the original); no."})
    debug: bool = field(default=False, metadata={"help": "A quick run, as the original's: 97 train questions, 33 evaluation items, a log line every step."})
    world_size: int = field(default=0, metadata={"help": "Several machines: processes in all (0: those of --device). With --rank_offset, "
                                                         "--master_addr and --master_port this becomes a torchrun multi-node launch."})
    rank_offset: int = field(default=0, metadata={"help": "Several machines: global rank of this machine's first process."})
    master_addr: str = field(default="127.0.0.1", metadata={"help": "Several machines: address of the machine holding rank 0."})
    master_port: int | None = field(default=None, metadata={"help": "Rendezvous port (default: a free one; required across machines)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps (TensorBoard under <output_dir>/runs)."})
    wandb: bool = field(default=False, metadata={"help": "Also log to Weights & Biases."})
    # Throughput switches (bench/RESULTS.md, "GPU step benchmark"). The defaults keep CPU runs' values as they were.
    attn_implementation: AttnImplementation = field(default="auto", metadata={"help": "Attention kernel: auto (sdpa where the architecture supports it, "
                                                                       "else eager, with a note), sdpa, eager, or flash_attention_2 (needs flash-attn)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each decoder layer's activations in backward "
                                                                          "(every forward of the shared step, the cached ones included): less memory, ~1/3 more compute."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile each decoder layer (shapes bucketed by --pad_to_multiple_of)."})
    pad_to_multiple_of: int = field(default=0, metadata={"help": "Pad every batch's prompt, continuation and positive/negative widths up to "
                                                                 "a multiple of N (masked: same values), so compiled kernels see few shapes. "
                                                                 "0: no padding, or 64 with --torch_compile."})
    optim: str = field(default="auto", metadata={"help": "Optimizer (a transformers optim name): auto = adamw_torch_fused (the Trainer's "
                                                         "default, one fused kernel on a GPU), or e.g. adamw_torch."})
    bf16_weights: bool = field(default=False, metadata={"help": "Pure bf16: weights, activations and gradients in bfloat16, no autocast; the "
                                                                "optimizer keeps fp32 master weights and fp32 AdamW state and copies the "
                                                                "rounded weights back after each step. Not with --deepspeed (use its bf16 section)."})
    note: str = field(default="", metadata={"help": "Free text; names the default output folder."})

    def __post_init__(self):  # loss settings are checked by losses.LossConfig, where they are used
        check_task(self.task)
        if self.contrastive and not (self.cl_pos_path and self.cl_neg_path):
            raise UserError("--contrastive yes needs both --cl_pos_path and --cl_neg_path")
        if self.save_best > 0 and not self.do_eval:
            raise UserError("--save_best K > 0 ranks checkpoints by accuracy: it needs --do_eval yes")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise UserError("--train_bsz and --grad_accum must be at least 1")
        if self.teacher_data_random != "one":
            try:
                keep = float(self.teacher_data_random)
            except ValueError:
                keep = -1.0
            if not 0.0 <= keep <= 1.0:
                raise UserError(f"--teacher_data_random: expected a probability in [0, 1] or 'one', got {self.teacher_data_random!r}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise UserError(f"--epoch must be > 0 (or --max_steps > 0), got {self.num_train_epochs}")
        if self.do_first_eval and not self.do_eval:
            raise UserError("--do_first_eval evaluates before training: it needs --do_eval yes")
        if self.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        check_choices(self)
        if self.optim != "auto" and self.optim not in optimizer_names():
            raise UserError(f"--optim: unknown optimizer {self.optim!r} (e.g. auto, adamw_torch_fused, adamw_torch)")
        if self.bf16_weights and (self.deepspeed or self.fp16):
            raise UserError("--bf16_weights keeps fp32 master weights itself: not with --fp16, nor with --deepspeed "
                            "(there, a \"bf16\": {\"enabled\": true} section does the same)")
        if self.torch_compile and self.deepspeed:
            # ZeRO-3 gathers and frees parameters in hooks around every layer; inside compiled layers those are
            # graph breaks and untested here. DeepSpeed's engine.compile() is its own switch.
            raise UserError("--torch_compile: not with --deepspeed (ZeRO-3's parameter hooks break the compiled layers; "
                            "run without one of them)")
        self.check_lora()

    @property
    def resume_path(self) -> str | None:
        """--resume PATH (a checkpoint folder), or None for yes/no."""
        return None if self.resume.lower() in ("yes", "no", "true", "false", "1", "0", "") else self.resume

    @property
    def resume_requested(self) -> bool:
        return self.resume_path is not None or self.resume.lower() in ("yes", "true", "1")


# ---------------------------------------------------------------- the teacher (query_teacher.py, teacher.run_collection)
@dataclass
class TeacherServerArguments:
    """Which teacher answers, and the limits on asking it (query_teacher.py, and the round driver for every teacher stage)."""
    BOUNDS: ClassVar[dict] = {"max_cost": ">0", "max_consecutive_failures": ">=0"}
    backend: Literal["openai", "offline"] = field(default="openai", metadata={"help": "openai: any OpenAI-compatible server (key from "
                                                                                      "env OPENAI_API_KEY); offline: built from gold "
                                                                                      "rationales (embedded tasks)."})
    teacher_model: str = field(default="gpt-3.5-turbo", metadata={"help": "Model name sent to the server."})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. "
                                                                 "http://127.0.0.1:8000/v1 (default: OpenAI / env OPENAI_BASE_URL)."})
    max_cost: float | None = field(default=None, metadata={"help": "Stop cleanly before a teacher stage's spend (USD) would pass this."})
    max_consecutive_failures: int = field(default=5, metadata={"help": "Stop the stage (exit 1, replies so far kept; the round "
                                                                       "driver stops with it) after this many failed connection "
                                                                       "attempts in a row (refused, DNS, timeout) with no answer "
                                                                       "from the server between: a teacher that is down. 0: never."})

    def check_server(self) -> None:
        if self.base_url:  # with the flags: before any stage that comes before the teacher
            from teacher_backends import check_base_url  # the teacher's own modules stay out of the others' imports
            check_base_url(self.base_url)


# ---------------------------------------------------------------- the drivers (run_rounds.py, reproduce.py)
@script_defaults(valid_size=(500, "The round driver's default: every stage holds out the same 500."),
                 bf16=(False, "Every stage (training, exam, evaluation)."),
                 backend=("offline", "The demo's default."),
                 num_train_epochs=(1, "Per round."),
                 per_device_train_batch_size=16,
                 learning_rate=(2e-4, "2e-4 was best on wordmath validation for the embedded student (of 2e-4, 5e-4, "
                                      "1e-3); GPT-J-6B used 7e-6."),
                 warmup_steps=20,
                 lr_scheduler_type=("constant_with_warmup", "The rounds' default: linear warm-up, then constant."),
                 max_grad_norm=(1.0, "The rounds clip at 1.0."),
                 cl_p=(0.1, "The original's 1.0 cost 14 points of wordmath validation accuracy against the lm arm; 0.1 "
                            "was the least harmful (experiments/RESULTS.md)."),
                 cl_neg_form=("gold", "The rounds use gold, the form the controlled runs measured."))
class RoundsArguments(DataArguments, DeviceArguments, LoraArguments, LossArguments, TrainRunArguments,
                      SamplesArguments, TeacherServerArguments):
    """The round driver. Defaults run the embedded demo: wordmath, the offline teacher, a tiny student, CPU.

    The flags it shares with a stage (they are declared once, in the groups above) are passed to that stage
    under their names (rounds.RoundDriver.command); the arms set --contrastive."""
    BOUNDS: ClassVar[dict] = {"teacher_samples": ">=1", "exam_limit": ">=0", "exam_batch": ">=1", "exam_max_new_tokens": ">=1",
                              "eval_limit": ">=0", "eval_batch": ">=1", "warm_steps": ">=0", "jobs": ">=1",
                              "annotate_limit": ">=0"}
    student: str = field(default="checkpoints/wordmath-student", metadata={"help": "Round-0 student (hub name or folder). The embedded one is built if missing."})
    workdir: str = field(default="runs/demo", metadata={"help": "One folder per round inside, plus rounds.json and rounds.png."})
    rounds: int = field(default=2, metadata={"help": "Number of rounds."})
    start_round: int = field(default=1, metadata={"help": "Skip rounds before this one (their manifests must exist)."})
    teacher_samples: int = field(default=2, metadata={"help": "Rationales per teacher request."})
    keep_previous_data: bool = field(default=True, metadata={"help": "Round r >= 2 also trains on the earlier rounds' teacher data and negatives."})
    exam_limit: int | None = field(default=200, metadata={"help": "Exam only the first N train questions (0: all)."})
    annotate_limit: int | None = field(default=400, metadata={"help": "Round 1's teacher annotates only the first N train questions "
                                                                      "(0: all): round 1's training data."})
    exam_batch: int = field(default=50, metadata={"help": "Exam prompts per batch (each sampled --num_return_sequences times). "
                                                                   "The default suits the 0.9M student on a CPU; a large model needs far fewer."})
    exam_max_new_tokens: int = field(default=160, metadata={"help": "Exam tokens per sample."})
    arms: str = field(default=",".join(DRIVER_ARMS), metadata={"help": "Comma list of arms trained side by side: "
                                                                    + "; ".join(f"{name} ({arm.describe})" for name, arm in DRIVER_ARMS.items())
                                                                    + ". One arm halves the cost."})
    eval_splits: str = field(default="validation,test", metadata={"help": "Splits evaluated after each round (choose settings on "
                                                                        "validation; test is for the reported number)."})
    eval_limit: int | None = field(default=200, metadata={"help": "Evaluate only the first N items of each split (0: all)."})
    eval_batch: int = field(default=200, metadata={"help": "Evaluation batch size. The default suits the 0.9M student on a CPU; a large "
                                                            "model needs far fewer."})
    warm_steps: int = field(default=600, metadata={"help": "Embedded student only: warm-start steps when it is built."})
    jobs: int | None = field(default=None, metadata={"help": "Stages run at once: independent arms (and seeds in reproduce.py) side "
                                                            "by side, their output in their logs, the cores shared out as torch "
                                                            "threads. Default: 2 with --device cpu on a machine with 2+ cores, else 1 "
                                                            "(stages on GPUs would share the cards)."})

    def __post_init__(self):
        check_task(self.task)
        check_choices(self)
        if self.contrastive:
            raise UserError("--contrastive: the arms set it (--arms: " + ", ".join(
                f"{name} {'with' if arm.contrastive else 'without'} it" for name, arm in DRIVER_ARMS.items()) + ")")
        if self.jobs is None:
            self.jobs = 2 if self.device.strip().lower() == "cpu" and (os.cpu_count() or 1) >= 2 else 1
        self.exam_limit = self.exam_limit or None  # 0: every question
        self.annotate_limit = self.annotate_limit or None
        self.eval_limit = self.eval_limit or None
        if self.rounds < 1 or not 1 <= self.start_round <= self.rounds:
            raise UserError("--rounds must be >= 1 and --start_round within 1..rounds")
        self.check_arms()
        splits = self.eval_splits.split(",")
        if not all(splits) or len(set(splits)) != len(splits):
            raise UserError(f"--eval_splits: expected a comma list of split names, got {self.eval_splits!r}")
        self.check_lora()
        self.check_server()

    def check_arms(self) -> None:
        check_arms(self.arms, DRIVER_ARMS)


@dataclass
class EvidenceArguments(RoundsArguments):
    """reproduce.py: the round driver's flags, passed to the stages the same way, and the harness's own.
    The defaults fit the embedded wordmath run of 3 seeds x all arms in 60 min on 2 CPU cores
    (evidence.py's docstring has the arithmetic); --quick is the small end-to-end check."""
    BOUNDS: ClassVar[dict] = {"seeds": ">=1", "bootstrap": ">=1", "prefer_beta": ">0", "prefer_gamma": ">=0", "threads": ">=0"}
    workdir: str = field(default="runs/evidence", metadata={"help": "round0/ (the shared round-0 student), seed<s>/ (one round-driver "
                                                                    "folder per seed), results.json, evidence.png. --quick: runs/evidence_quick."})
    arms: str = field(default=",".join(EVIDENCE_ARMS), metadata={"help": "Comma list of arms (the arms they build on run too): "
                                                                         + ", ".join(EVIDENCE_ARMS) + "."})
    exam_limit: int | None = field(default=150, metadata={"help": "Exam only the first N train questions (0: all); the budget's choice, "
                                                                  "see evidence.py."})
    eval_limit: int | None = field(default=300, metadata={"help": "Evaluate only the first N items of each split (validation has 1000, "
                                                                  "test 300); the budget's choice."})
    annotate_limit: int | None = field(default=600, metadata={"help": "Round 1's teacher annotates only the first N train questions "
                                                                      "(0: all): round 1's training data, the budget's choice."})
    seeds: int = field(default=3, metadata={"help": "Seeds --seed, --seed + 1, ...: each varies data order, exam sampling, the "
                                                    "offline teacher's phrasing and the untailored draw. The round-0 student is shared."})
    quick: bool = field(default=False, metadata={"help": "The small end-to-end check (1 seed, small splits, few steps; evidence.QUICK); "
                                                         "flags given on the command line still win."})
    prefer_loss: Literal["simpo", "orpo"] = field(default="simpo", metadata={"help": "Arm +prefer: the preference loss "
                                                                                     "(run_trainer.py --cl_loss)."})
    prefer_beta: float = field(default=2.0, metadata={"help": "Arm +prefer with simpo: beta (--cl_beta)."})
    prefer_gamma: float = field(default=1.0, metadata={"help": "Arm +prefer with simpo: gamma (--cl_gamma)."})
    prefer_neg_form: NegForm = field(default="own", metadata={"help": "Arm +prefer: the rejected text (--cl_neg_form); own: the student's "
                                                                  "mistake as it wrote it, its wrong answer line included."})
    bootstrap: int = field(default=2000, metadata={"help": "Bootstrap resamples of the paired intervals."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for the stages (OMP_NUM_THREADS, unless already set); stages "
                                                      "running side by side (--jobs) split them evenly, since two stages of two threads "
                                                      "each on 2 cores ran 4-9x slower. 0: every core."})

    def check_arms(self) -> None:
        check_arms(self.arms, EVIDENCE_ARMS)


@dataclass
class PrepareArguments:
    task: str = field(default="all", metadata={"help": "wordmath, gsm_symbolic or all."})
    data_dir: str = field(default="localdataset", metadata={"help": "Output root: <data_dir>/<task>/{train,test}.jsonl."})
    train_size: int = field(default=2000, metadata={"help": "Train problems per task."})
    test_size: int = field(default=300, metadata={"help": "Test problems per task."})
    valid_size: int = field(default=1000, metadata={"help": "Validation problems per task (what tuning and --save_best read)."})
    seed: int = field(default=1234, metadata={"help": "Train seed; test uses seed + 1, validation seed + 2, each excluding the splits before it."})
    min_steps: int = field(default=2, metadata={"help": "wordmath: fewest operations per problem."})
    max_steps: int = field(default=3, metadata={"help": "wordmath: most operations per problem."})
    max_start: int = field(default=20, metadata={"help": "wordmath: largest starting amount."})
    max_operand: int = field(default=9, metadata={"help": "wordmath: largest amount added or removed."})


@dataclass
class StudentArguments:
    task: str = field(default="wordmath", metadata={"help": "Task whose train split gives the tokenizer corpus and warm-start data."})
    data_dir: str = field(default="localdataset", metadata={"help": "Dataset root (see prepare_data.py)."})
    out: str = field(default="checkpoints/wordmath-student", metadata={"help": "Output folder."})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size."})
    n_layer: int = field(default=4, metadata={"help": "Transformer layers."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    warm_steps: int = field(default=600, metadata={"help": "Warm-start optimizer steps (0: random weights)."})
    warm_examples: int = field(default=1000, metadata={"help": "Train problems used by the warm start."})
    batch_size: int = field(default=32, metadata={"help": "Warm-start batch size."})
    lr: float = field(default=2e-3, metadata={"help": "Warm-start peak learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed for weights and batches."})
    force: bool = field(default=False, metadata={"help": "Rebuild even if --out already holds a student built with these settings."})

@dataclass
class PretrainedStudentArguments:
    out: str = field(default="checkpoints/smollm2-135m-instruct", metadata={"help": "Output folder (a plain HF folder)."})
    force: bool = field(default=False, metadata={"help": "Rebuild even if --out already holds it."})


@dataclass
class TeacherArguments(TaskArguments, TeacherServerArguments):
    BOUNDS: ClassVar[dict] = {
        "num_samples": ">=1", "temperature": ">=0", "max_tokens": ">=1", "concurrency": ">=1", "request_timeout": ">0",
        "max_retries": ">=0", "backoff_base": ">=0", "max_requests": ">=1",
        "prompt_price_per_1m": ">=0", "completion_price_per_1m": ">=0", "est_completion_tokens": ">=1",
        "offline_error_rate": ">=0", "limit": ">=1", "max_wrong_per_question": ">=1", "random_questions": ">=1"}
    mode: Literal["annotate", "feedback"] = field(default="annotate", metadata={"help": "annotate: rationales for a whole split; "
                                                                                       "feedback: tailored rationales for the "
                                                                                       "student's mistakes."})
    test_on: str = field(default="train", metadata={"help": "Split whose questions go to the teacher."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N questions of the split."})
    random_questions: int | None = field(default=None, metadata={"help": "annotate mode: only N questions drawn at random "
                                                                          "(seeded by --seed) from the split (after --limit), asked "
                                                                          "in split order: an untailored control with the request "
                                                                          "count of a feedback round."})
    student_wrong: str | None = field(default=None, metadata={"help": "feedback mode: the exam's student_wrong.json "
                                                                      "({question: [wrong rationale, ...]})."})
    max_wrong_per_question: int = field(default=2, metadata={"help": "feedback mode: at most this many wrong "
                                                                     "rationales per question get a request."})
    skip_unknown_questions: bool = field(default=False, metadata={"help": "feedback mode: skip (and count) questions "
                                                                          "not in the split instead of failing."})
    output_dir: str = field(default="teacher_out", metadata={"help": "Gets teacher_data.json, teacher_provenance.jsonl, "
                                                                     "journal.jsonl, summary.json."})
    num_samples: int = field(default=2, metadata={"help": "Rationales per request (the API's n); two or more give "
                                                          "the triplet loss a positive."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the teacher."})
    max_tokens: int = field(default=320, metadata={"help": "Completion tokens per rationale at most."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds before one attempt times out."})
    max_retries: int = field(default=5, metadata={"help": "Retries per request on 429, 5xx, timeouts, connection errors."})
    backoff_base: float = field(default=1.0, metadata={"help": "First retry delay in seconds (doubles each time, "
                                                               "with jitter; a retry-after header wins)."})
    max_requests: int | None = field(default=None, metadata={"help": "Stop cleanly after this many new requests."})
    price_table: str | None = field(default=None, metadata={"help": "JSON {model: {prompt_per_1m, completion_per_1m}} "
                                                                    "(USD per 1M tokens) over the built-in table."})
    prompt_price_per_1m: float | None = field(default=None, metadata={"help": "Override: USD per 1M prompt tokens."})
    completion_price_per_1m: float | None = field(default=None, metadata={"help": "Override: USD per 1M completion tokens."})
    est_completion_tokens: int = field(default=150, metadata={"help": "Completion length assumed per rationale by "
                                                                      "--dry_run and the --max_cost check."})
    dry_run: bool = field(default=False, metadata={"help": "Estimate requests, tokens and cost; send nothing, write nothing."})
    offline_error_rate: float = field(default=0.05, metadata={"help": "offline backend: share of rationales written "
                                                                      "with a wrong final answer (filter practice)."})

    def __post_init__(self):
        check_task(self.task)
        # here as well as in parse(): the round driver builds these directly, and a NaN temperature
        # would otherwise reach the server and come back as "malformed replies", retried for nothing
        check_bounds(self)
        if not 0.0 <= self.offline_error_rate <= 1.0:
            raise UserError(f"--offline_error_rate must be in [0, 1], got {self.offline_error_rate}")
        check_choices(self)
        if self.student_wrong and self.mode != "feedback":
            raise UserError("--student_wrong is read by --mode feedback only (annotate asks about the whole split)")
        if self.random_questions is not None and self.mode != "annotate":
            raise UserError("--random_questions draws questions to annotate: it needs --mode annotate (feedback asks "
                            "about the student's mistakes)")
        self.check_server()
