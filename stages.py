"""Each stage's contract with the drivers (rounds.py, evidence.py): the script that runs it, the dataclass
its flags parse into (the driver builds the command from it, so a bad flag fails before anything runs),
and what a finished run leaves in its output folder, read back in brief. A stage whose reader returns
None has not finished, and the driver runs it (again).

Process supervision (forks, logs, jobs) is stage_process.py's; the stages' own code is not imported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from args import ExamArguments, InferArguments, TeacherArguments, TrainArguments
from common import read_json


def evaluation_result(out: Path) -> dict | None:
    """infer.py: the newest Acc<acc>.json, accuracies as fractions."""
    files = sorted(out.glob("Acc*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    result = read_json(files[-1])
    return {"acc": result["accuracy"], "strict_acc": result["strict_accuracy"], "correct": result["correct"],
            "total": result["total"], "file": str(files[-1])}


def exam_result(out: Path) -> dict | None:
    """infer_student_wrong.py: summary.json is written last, after student_wrong.json."""
    if not (out / "summary.json").is_file():
        return None
    summary = read_json(out / "summary.json")
    return {"student_wrong": str(out / "student_wrong.json"), "accuracy": summary["accuracy"],
            "questions_with_mistakes": summary["questions_with_mistakes"], "negatives": summary["wrong_rationales"]}


def teacher_result(out: Path) -> dict | None:
    """query_teacher.py: a summary that records failed requests is unfinished (a re-run asks only those;
    the journal answers the rest)."""
    if not (out / "summary.json").is_file() or not (out / "teacher_data.json").is_file():
        return None
    summary = read_json(out / "summary.json")
    if summary.get("failure"):
        return None
    return {"teacher_data": str(out / "teacher_data.json"), "template_hash": summary.get("template_hash"),
            "model": summary.get("model"), "kept": summary["samples"]["kept"],
            "rejected": summary["samples"]["rejected"], "cost_usd": summary["cost_usd"]["all_requests"],
            "requests": summary["requests"]["total"], "questions_asked": summary.get("questions_asked"),
            "tokens": summary.get("tokens")}


def training_result(out: Path) -> dict | None:
    """run_trainer.py: final/run_args.json is written after the final weights."""
    final = out / "final"
    return {"checkpoint": str(final)} if (final / "run_args.json").is_file() else None


@dataclass(frozen=True)
class Stage:
    script: str
    arguments: type
    result: Callable[[Path], dict | None]


EVALUATION = Stage("infer.py", InferArguments, evaluation_result)
EXAM = Stage("infer_student_wrong.py", ExamArguments, exam_result)
TEACHER = Stage("query_teacher.py", TeacherArguments, teacher_result)
TRAINING = Stage("run_trainer.py", TrainArguments, training_result)
