"""Command-line arguments of every script, as dataclasses parsed by HfArgumentParser (flags.py).

Each flag is declared once, in a group (TaskArguments, ModelArguments, LossArguments, ...); a script's class is
composed of the groups it takes, and `script_defaults` gives a script its own default for a shared flag.
Choices are `Literal` types; numeric bounds are each group's BOUNDS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common import UserError
from flags import check_bounds, check_choices, check_task, optimizer_names, script_defaults
from tasks import TASKS


@dataclass
class TaskArguments:
    """Which task and data: every script that reads a split."""
    BOUNDS: ClassVar[dict] = {"valid_size": ">=0"}
    task: str = field(default="wordmath", metadata={"help": "Task name: " + ", ".join(TASKS) + "."})
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
Engine = Literal["hf", "vllm"]  # generation.ENGINES


@dataclass
class EngineArguments:
    """The generation engine (also the round driver's flag, passed on by name to the exam and evaluation)."""
    engine: Engine = field(default="hf", metadata={"help": "What runs generation (exam and evaluation): hf (the model's own generate, in this "
                                                           "environment) or vllm (vLLM: continuous batching, paged KV cache; its "
                                                           "own environment, built by `bash scripts/env.sh --vllm`). Same prompts, "
                                                           "same post-processing, same output files."})


@dataclass
class GenerationArguments(ModelArguments, DataArguments, EngineArguments):
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
class SamplingArguments:
    """How answers are sampled: the exam's, and infer.py's --self_consistency. Not the round driver's: a
    `temperature` there would also reach the teacher's flag of that name."""
    BOUNDS: ClassVar[dict] = {"temperature": ">0", "top_k": ">=0"}
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (0: all tokens)."})


@dataclass
class InferArguments(GenerationArguments, SamplingArguments):
    BOUNDS: ClassVar[dict] = {"self_consistency": ">=0"}
    self_consistency: int = field(default=0, metadata={"help": "K > 0: also sample K rationales per question (--temperature, "
                                                                "--top_k, seeded by --seed) and report maj@K (the most frequent "
                                                                "answer is right) and pass@K (any sample is right) beside greedy "
                                                                "accuracy."})
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
class ExamArguments(GenerationArguments, SamplesArguments, SamplingArguments):
    pass


# ---------------------------------------------------------------- training (run_trainer.py)
# The original's defaults where ours differ on purpose (its README passes every one of them explicitly).
ORIGINAL_TRAIN_DEFAULTS = {"merge_losses": False, "weight_decay": 0.1, "learning_rate": 1e-6, "per_device_eval_batch_size": 4}
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
MleMode = Literal["weight", "hf", "nograd", "no"]
ReprMode = Literal["last", "pool"]
AnchorMode = Literal["detached", "full"]
LmLossImpl = Literal["auto", "logits", "chunked", "liger"]
NegForm = Literal["original", "gold", "own"]
# transformers' SchedulerType, less those this repo cannot drive (tests/test_bad_inputs.py holds the two lists against
# the installed library), plus the original's warmup_log
LrScheduler = Literal["warmup_log", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                      "constant_with_warmup", "inverse_sqrt"]
STEPS_ON_TRAINER_EVAL = ("steps on the metric of the Trainer's own evaluation, which does not run here (evaluation is "
                         "accuracy by generation): it would stay constant")
SCHEDULERS_LEFT_OUT = {
    "cosine_with_min_lr": "needs lr_scheduler_kwargs (min_lr), which no flag sets",
    "cosine_warmup_with_min_lr": "needs lr_scheduler_kwargs (min_lr), which no flag sets",
    "warmup_stable_decay": "needs lr_scheduler_kwargs (num_decay_steps), which no flag sets",
    "reduce_lr_on_plateau": STEPS_ON_TRAINER_EVAL,
    "greedy": STEPS_ON_TRAINER_EVAL,
}
SaveStrategy = Literal["epoch", "steps", "no"]  # transformers' SaveStrategy less "best" (--save_best K does that here)


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
    lr_scheduler_type: LrScheduler = field(default="warmup_log", metadata={"help": "warmup_log: the original's (DeepSpeed WarmupLR's default: from 0 to the "
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
    save_strategy: SaveStrategy = field(default="epoch", metadata={"help": "When to write checkpoint-<step>/: epoch, steps (with --save_steps) or no."})
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


@dataclass
class PrepareArguments:
    task: str = field(default="all", metadata={"help": ", ".join(name for name, t in TASKS.items() if t.generator) + " or all."})
    data_dir: str = field(default="localdataset", metadata={"help": "Output root: <data_dir>/<task>/{train,test}.jsonl."})
    train_size: int = field(default=2000, metadata={"help": "Train problems per task."})
    test_size: int = field(default=300, metadata={"help": "Test problems per task."})
    valid_size: int = field(default=1000, metadata={"help": "Validation problems per task (what tuning and --save_best read)."})
    seed: int = field(default=1234, metadata={"help": "Train seed; test uses seed + 1, validation seed + 2; it also seeds how templates are dealt to the splits (no template or masked question in two splits)."})
    min_steps: int = field(default=1, metadata={"help": "wordmath: fewest operations per problem (1: a share of one-step problems, so questions differ in difficulty and an exam has some to select against)."})
    # Chosen so that the warm-started student sits mid-range on validation (60%: 87% on one-step problems down to
    # 37% on four) instead of at the ceiling (the 1-3 step, 20/9 task reached 96% with the same warm start),
    # leaving the teacher something to teach and the exam something to select (bench/RESULTS.md, "warm start").
    max_steps: int = field(default=4, metadata={"help": "wordmath: most operations per problem."})
    max_start: int = field(default=50, metadata={"help": "wordmath: largest starting amount."})
    max_operand: int = field(default=20, metadata={"help": "wordmath: largest amount added or removed."})


@dataclass
class StudentArguments:
    task: str = field(default="wordmath", metadata={"help": "Task whose train split gives the tokenizer corpus and warm-start data."})
    data_dir: str = field(default="localdataset", metadata={"help": "Dataset root (see prepare_data.py)."})
    out: str = field(default="checkpoints/wordmath-student", metadata={"help": "Output folder."})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size."})
    n_layer: int = field(default=4, metadata={"help": "Transformer layers."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    warm_steps: int = field(default=1500, metadata={"help": "Warm-start optimizer steps (0: random weights); chosen on "
                                                            "validation (bench/RESULTS.md, \"warm start\")."})
    warm_examples: int = field(default=2000, metadata={"help": "Train problems used by the warm start."})
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
    random_questions: int | None = field(default=None, metadata={"help": "annotate mode: only N requests drawn at random "
                                                                          "(seeded by --seed) from the split (after --limit), at most "
                                                                          "--max_wrong_per_question per question, asked in split order: "
                                                                          "an untailored control with the request count of a feedback "
                                                                          "round over the same questions."})
    student_wrong: str | None = field(default=None, metadata={"help": "feedback mode: the exam's student_wrong.json "
                                                                      "({question: [wrong rationale, ...]})."})
    max_wrong_per_question: int = field(default=2, metadata={"help": "feedback mode: at most this many wrong "
                                                                     "rationales per question get a request; with "
                                                                     "--random_questions, at most this many requests per question."})
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
    offline_error_rate: float = field(default=0.1, metadata={"help": "offline backend: the teacher's slip rate, the "
                                                                     "share of rationales whose last step's result and "
                                                                     "final answer are both wrong (consistent, so only "
                                                                     "the gold-answer filter catches them)."})

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
