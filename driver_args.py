"""Flags of the drivers, run_rounds.py (RoundsArguments) and reproduce.py (EvidenceArguments).

A driver's class is composed of the stages' own flag groups (args.py): a flag it shares with a stage is that
stage's flag, declared once, and rounds.RoundDriver.command passes it on under its name. Where the demo wants
another default than a stage script's, `script_defaults` says so, with why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from args import (DataArguments, DeviceArguments, EngineArguments, LoraArguments, LossArguments, NegForm, SamplesArguments,
                  TeacherServerArguments, TrainRunArguments)
from arms import DRIVER_ARMS, EVIDENCE_ARMS, check_arms
from common import UserError
from flags import check_choices, check_task, script_defaults


EMBEDDED_STUDENT = "checkpoints/wordmath-student"  # built by the driver when missing


@script_defaults(valid_size=(500, "The round driver's default: every stage holds out the same 500."),
                 bf16=(False, "Every stage (training, exam, evaluation)."),
                 backend=("offline", "The demo's default."),
                 num_train_epochs=(1, "Per round."),
                 per_device_train_batch_size=16,
                 learning_rate=(2e-4, "2e-4 was best on wordmath validation for the embedded student (tune.py: of 1e-4, "
                                      "2e-4, 5e-4, 1e-3); GPT-J-6B used 7e-6."),
                 warmup_steps=20,
                 lr_scheduler_type=("constant_with_warmup", "The rounds' default: linear warm-up, then constant."),
                 max_grad_norm=(1.0, "The rounds clip at 1.0."),
                 cl_p=(0.003, "Chosen on wordmath validation by tune.py for the embedded student (of 0.003 to 1.0, with "
                              "the rate 2e-4 chosen first): accuracy fell as the margin grew, 1.0 cost 6.5 points "
                              "against LM loss only (bench/RESULTS.md, \"tuning\")."),
                 cl_neg_form=("gold", "The rounds use gold, the form the controlled runs measured."))
class RoundsArguments(DataArguments, DeviceArguments, LoraArguments, LossArguments, TrainRunArguments,
                      SamplesArguments, TeacherServerArguments, EngineArguments):
    """The round driver. Defaults run the embedded demo: wordmath, the offline teacher, a tiny student, CPU.

    The flags it shares with a stage (they are declared once, in the groups above) are passed to that stage
    under their names (rounds.RoundDriver.command); the arms set --contrastive."""
    BOUNDS: ClassVar[dict] = {"teacher_samples": ">=1", "exam_limit": ">=0", "exam_batch": ">=1", "exam_max_new_tokens": ">=1",
                              "eval_limit": ">=0", "eval_batch": ">=1", "warm_steps": ">=0", "jobs": ">=1",
                              "annotate_limit": ">=0"}
    ARMS: ClassVar[dict] = DRIVER_ARMS  # what --arms may name
    student: str = field(default=EMBEDDED_STUDENT, metadata={"help": "Round-0 student (hub name or folder). The embedded one is built if missing."})
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
    warm_steps: int = field(default=1500, metadata={"help": "Embedded student only: warm-start steps when it is built "
                                                            "(build_student.py's default, chosen on validation)."})
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
        check_arms(self.arms, self.ARMS)
        splits = self.eval_splits.split(",")
        if not all(splits) or len(set(splits)) != len(splits):
            raise UserError(f"--eval_splits: expected a comma list of split names, got {self.eval_splits!r}")
        self.check_lora()
        self.check_server()

@dataclass
class EvidenceArguments(RoundsArguments):
    """reproduce.py: the round driver's flags, passed to the stages the same way, and the harness's own.
    The defaults fit the embedded wordmath run of 3 seeds x all arms in 60 min on 2 CPU cores
    (evidence.py's docstring has the arithmetic); --quick is the small end-to-end check."""
    BOUNDS: ClassVar[dict] = {"seeds": ">=1", "bootstrap": ">=1", "prefer_beta": ">0", "prefer_gamma": ">=0", "threads": ">=0"}
    ARMS: ClassVar[dict] = EVIDENCE_ARMS
    workdir: str = field(default="runs/evidence", metadata={"help": "round0/ (the shared round-0 student), seed<s>/ (one round-driver "
                                                                    "folder per seed), results.json, evidence.png. --quick: runs/evidence_quick."})
    arms: str = field(default=",".join(EVIDENCE_ARMS), metadata={"help": "Comma list of arms (the arms they build on run too): "
                                                                         + ", ".join(EVIDENCE_ARMS) + "."})
    exam_limit: int | None = field(default=300, metadata={"help": "Exam only the first N train questions (0: all): the questions round "
                                                                  "2's feedback and its untailored control choose from; see evidence.py."})
    eval_limit: int | None = field(default=300, metadata={"help": "Evaluate only the first N items of each split (validation has 1000, "
                                                                  "test 300); the budget's choice."})
    annotate_limit: int | None = field(default=600, metadata={"help": "Round 1's teacher annotates only the first N train questions "
                                                                      "(0: all): round 1's training data, the budget's choice."})
    seeds: int = field(default=5, metadata={"help": "Seeds --seed, --seed + 1, ...: each varies data order, exam sampling, the "
                                                    "offline teacher's phrasing and the untailored draw. The round-0 student is shared. "
                                                    "5: with 3, the seed t interval has 2 df and, Holm-corrected over 10 pairs, "
                                                    "spans +-14 standard errors."})
    quick: bool = field(default=False, metadata={"help": "The small end-to-end check (1 seed, small splits, few steps; evidence.QUICK); "
                                                         "flags given on the command line still win."})
    prefer_loss: Literal["simpo", "orpo"] = field(default="simpo", metadata={"help": "Arm +prefer: the preference loss "
                                                                                     "(run_trainer.py --cl_loss)."})
    prefer_beta: float = field(default=2.0, metadata={"help": "Arm +prefer with simpo: beta (--cl_beta)."})
    prefer_gamma: float = field(default=1.0, metadata={"help": "Arm +prefer with simpo: gamma (--cl_gamma)."})
    prefer_neg_form: NegForm = field(default="own", metadata={"help": "Arm +prefer: the rejected text (--cl_neg_form); own: the student's "
                                                                  "mistake as it wrote it, its wrong answer line included."})
    bootstrap: int = field(default=2000, metadata={"help": "Bootstrap resamples of the paired intervals."})
    dry_run: bool = field(default=False, metadata={"help": "Print each seed's teacher requests and estimated cost (round 1 "
                                                           "exactly, feedback at its bound), then stop: nothing is sent, "
                                                           "trained or written."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for the stages (OMP_NUM_THREADS, unless already set); stages "
                                                      "running side by side (--jobs) split them evenly, since two stages of two threads "
                                                      "each on 2 cores ran 4-9x slower. 0: every core."})
