"""The round driver: exam -> teacher -> training -> evaluation, round after round.

Every stage is an ordinary command of this repo (printed before it runs, so any stage can be
re-run by hand) writing into `<workdir>/<arm>/round<r>/<stage>/`. A stage whose outputs exist is
skipped, so an interrupted run continues where it stopped; each round's manifest.json records
inputs, outputs, teacher model, template hash, counts, accuracy (validation and test) and wall time.
Arms (`--arms`) are trained side by side from the same student and data: `reflect` (the method)
and `lm` (LM loss only, the control), so the table shows what self-reflection adds.

Round 1: teacher annotation of the train split + exam of the round-0 student -> training from
round 0. Round r >= 2: exam of the round r-1 student -> tailored feedback on its mistakes ->
training from the round r-1 checkpoint (with earlier rounds' data too if --keep_previous_data).
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import distributed
from arms import DRIVER_ARMS
from common import UserError, atomic_write_json, read_json
from driver_args import EMBEDDED_STUDENT
from flags import device_list, to_argv
from stage_process import run_command, run_jobs, say, stage_lock
from stages import EVALUATION, EXAM, TEACHER, TRAINING, Stage


def merge_rationale_files(paths: list[str], out: Path) -> None:
    """Union of {question: [text, ...]} files, first-seen order, no duplicate texts."""
    merged: dict[str, list[str]] = {}
    for path in paths:
        for question, texts in read_json(path).items():
            bucket = merged.setdefault(question, [])
            bucket.extend(t for t in texts if t not in bucket)
    atomic_write_json(out, merged)


class RoundDriver:
    """Runs each arm of `--arms` round after round from the same round-0 student. Round 0's
    evaluation and round 1's exam and teacher annotation do not depend on the arm: they run once,
    in `<workdir>/round0` and `<workdir>/round1`, and every arm reads them; everything else of an
    arm lives in `<workdir>/<arm>/round<r>/`."""

    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.python = sys.executable
        self.arms = args.arms.split(",")
        self.splits = args.eval_splits.split(",")

    # ------------------------------------------------------------ stages (each a command)
    def command(self, stage: Stage, **values) -> list[str]:
        """The stage's command line: every driver setting the stage has under the same name, then `values`.
        Built from the stage's own dataclass, so a renamed or invalid flag fails here, before any stage runs."""
        names = {f.name for f in fields(stage.arguments)}
        shared = {f.name: getattr(self.args, f.name) for f in fields(self.args) if f.name in names}
        return [self.python, stage.script, *to_argv(stage.arguments, **{**shared, **values})]

    def eval_command(self, checkpoint: str, out: Path, split: str) -> list[str]:
        return self.command(EVALUATION, rationale=True, test_on=split, checkpoint=checkpoint,
                            batch=self.args.eval_batch, limit=self.args.eval_limit, output_dir=str(out))

    def exam_command(self, checkpoint: str, out: Path) -> list[str]:
        a = self.args
        return self.command(EXAM, rationale=True, test_on="train", checkpoint=checkpoint, batch=a.exam_batch,
                            max_new_tokens=a.exam_max_new_tokens, limit=a.exam_limit, output_dir=str(out))

    def teacher_command(self, mode: str, out: Path, student_wrong: str | None, **extra) -> list[str]:
        return self.command(TEACHER, mode=mode, test_on="train", num_samples=self.args.teacher_samples,
                            student_wrong=student_wrong, output_dir=str(out), **extra)

    def train_command(self, start_checkpoint: str, teacher_data: str, negatives: str, out: Path,
                      contrastive: bool, **extra) -> list[str]:
        return self.command(TRAINING, checkpoint=start_checkpoint, teacher_data=teacher_data,
                            weight_decay=0.01, contrastive=contrastive, cl_pos_path=teacher_data,
                            cl_neg_path=negatives, merge_losses=True, output_dir=str(out), resume="yes",
                            logging_steps=20, **extra)

    def run_stage(self, stage: Stage, command: Callable[[], list[str]], out: Path) -> dict:
        """The stage's outputs, after running `command()` unless a finished run left them (one runner per folder)."""
        with stage_lock(out):
            if stage.result(out) is None:
                run_command(command(), out / "log.txt")
            return stage.result(out)

    def evaluate(self, checkpoint: str, out: Path, split: str) -> dict:
        return self.run_stage(EVALUATION, lambda: self.eval_command(checkpoint, out, split), out)

    def evaluate_all(self, checkpoint: str, folder: Path) -> dict:
        return {split: self.evaluate(checkpoint, folder / f"eval_{split}", split) for split in self.splits}

    def exam(self, checkpoint: str, out: Path) -> dict:
        return self.run_stage(EXAM, lambda: self.exam_command(checkpoint, out), out)

    def teacher(self, mode: str, out: Path, student_wrong: str | None = None, **extra) -> dict:
        return self.run_stage(TEACHER, lambda: self.teacher_command(mode, out, student_wrong, **extra), out)

    def train(self, start_checkpoint: str, teacher_data: str, negatives: str, out: Path, contrastive: bool,
              **extra) -> str:
        return self.run_stage(TRAINING, lambda: self.train_command(start_checkpoint, teacher_data, negatives, out,
                                                                  contrastive, **extra), out)["checkpoint"]

    # ------------------------------------------------------------ rounds
    def round_dir(self, arm: str, r: int) -> Path:
        return self.workdir / arm / f"round{r}"

    def checkpoint_of(self, arm: str, r: int) -> str:
        if r == 0:
            return self.args.student
        return read_json(self.round_dir(arm, r) / "manifest.json")["checkpoint"]

    # What a round of an arm is made of. Subclasses (evidence.py) change these, not run_round.
    def parent_arm(self, arm: str, r: int) -> str:
        """The arm whose round r - 1 this round continues from."""
        return arm

    def exam_dir(self, arm: str, r: int) -> Path:
        """Round 1's exam (of the round-0 student) serves every arm; later exams are the arm's own."""
        return self.workdir / "round1" / "exam" if r == 1 else self.round_dir(arm, r) / "exam"

    def collect(self, arm: str, r: int, exam: dict) -> dict:
        """The teacher stage: round 1 annotates the train split once for every arm; later rounds ask
        for tailored feedback on this round's exam mistakes."""
        if r == 1:
            return self.teacher("annotate", self.workdir / "round1" / "teacher", limit=self.args.annotate_limit)
        return self.teacher("feedback", self.round_dir(arm, r) / "teacher", exam["student_wrong"])

    def train_settings(self, arm: str, r: int, planning: bool = False) -> dict:
        """Training flags of this arm's round beyond the driver's own (at least `contrastive`). planning: before
        the run (`preflight`), a value read from an earlier stage's output is a stand-in of the same type."""
        return {"contrastive": DRIVER_ARMS[arm].contrastive}

    # ------------------------------------------------------------ before the first stage
    def planned_rounds(self) -> list[tuple[str, int]]:
        return [(arm, r) for arm in self.arms for r in range(self.args.start_round, self.args.rounds + 1)]

    def preflight(self) -> None:
        """Everything a run can be refused for, checked before its first stage (exit 2, nothing written): the
        devices, the engine, the student folder, the manifests of the rounds it skips, and the command of every
        stage of every planned round, built from the stages' own dataclasses with the paths the run will use."""
        a = self.args
        distributed.check_devices(device_list(a.device))
        if a.engine != "hf":
            from generation import engine_class
            engine_class(a.engine)  # a missing library is one line naming its install command
        check_student_folder(a.student)
        for arm in self.arms:
            for r in range(1, a.start_round):
                path = self.round_dir(arm, r) / "manifest.json"
                if not path.is_file():
                    raise UserError(f"--start_round {a.start_round}: round {r} of arm {arm} has no {path}; run it first")
                manifest = read_json(path)
                if not isinstance(manifest, dict) or "checkpoint" not in manifest:
                    raise UserError(f"{path}: not a finished round's manifest (no 'checkpoint'); run round {r} again")
        for split in self.splits:
            self.eval_command(a.student, self.workdir / "round0" / f"eval_{split}", split)
        for arm, r in self.planned_rounds():
            folder = self.round_dir(arm, r)
            exam = self.exam_dir(arm, r)
            self.exam_command(a.student, exam)
            self.teacher_command("annotate", folder / "teacher", None, limit=a.annotate_limit)
            self.teacher_command("feedback", folder / "teacher", str(exam / "student_wrong.json"))
            self.train_command(a.student, str(folder / "teacher" / "teacher_data.json"), str(exam / "student_wrong.json"),
                               folder / "train", **self.train_settings(arm, r, planning=True))
            for split in self.splits:
                self.eval_command(str(folder / "train" / "final"), folder / f"eval_{split}", split)

    def run_round(self, arm: str, r: int) -> dict:
        started = time.time()
        folder = self.round_dir(arm, r)
        parent = self.parent_arm(arm, r)
        previous = self.checkpoint_of(parent, r - 1)
        manifest = {"round": r, "arm": arm, "task": self.args.task, "start_checkpoint": previous,
                    "backend": self.args.backend}
        # wall time adds up over interrupted runs; a re-run that skips every stage adds ~nothing
        earlier_seconds = read_json(folder / "manifest.json").get("seconds", 0) if (folder / "manifest.json").is_file() else 0
        exam = self.exam(previous, self.exam_dir(arm, r))
        collected = self.collect(arm, r, exam)
        teacher_data, negatives = collected["teacher_data"], exam["student_wrong"]
        if self.args.keep_previous_data and r > 1:  # the previous round's inputs already hold the ones before
            earlier = read_json(self.round_dir(parent, r - 1) / "manifest.json")["train_inputs"]
            teacher_data = str(folder / "train_teacher_data.json")
            negatives = str(folder / "train_negatives.json")
            merge_rationale_files([earlier["teacher_data"], collected["teacher_data"]], Path(teacher_data))
            merge_rationale_files([earlier["negatives"], exam["student_wrong"]], Path(negatives))
        checkpoint = self.train(previous, teacher_data, negatives, folder / "train", **self.train_settings(arm, r))
        evaluation = self.evaluate_all(checkpoint, folder)
        manifest.update(exam=exam, teacher=collected, train_inputs={"teacher_data": teacher_data, "negatives": negatives},
                        checkpoint=checkpoint, eval=evaluation,
                        seconds=round(earlier_seconds + time.time() - started, 1))
        atomic_write_json(folder / "manifest.json", manifest)
        return manifest

    def run_arm_rounds(self, arm: str) -> list[dict]:
        """Every round of one arm, in order (rounds before --start_round from their manifests)."""
        rows = []
        for r in range(1, self.args.rounds + 1):
            if r < self.args.start_round:
                rows.append(read_json(self.round_dir(arm, r) / "manifest.json"))
                continue
            say(f"\n===== round {r}, arm {arm} =====")
            rows.append(self.run_round(arm, r))
        return rows

    def run(self) -> dict:
        a = self.args
        # Arms are independent once round 1's exam and teacher (shared, run by whichever arm comes first)
        # exist: with --jobs 2 the first arm starts on them while the round-0 evaluations run beside it.
        folder = self.workdir / "round0"
        jobs = {("arm", self.arms[0]): (lambda: self.run_arm_rounds(self.arms[0]), ())}
        jobs |= {("eval", split): (lambda split=split: self.evaluate(a.student, folder / f"eval_{split}", split), ())
                 for split in self.splits}
        jobs |= {("arm", arm): (lambda arm=arm: self.run_arm_rounds(arm), ()) for arm in self.arms[1:]}
        done = run_jobs(jobs, a.jobs)
        student = {"round": 0, "arm": "student", "eval": {split: done["eval", split] for split in self.splits},
                   "teacher": None, "exam": None}
        result = {"splits": self.splits, "student": student, "arms": {arm: done["arm", arm] for arm in self.arms}}
        atomic_write_json(self.workdir / "rounds.json", result)
        print_table(result)
        plot(result, self.workdir / "rounds.png")
        return result


def check_student_folder(student: str) -> None:
    """A local round-0 student must be a model folder with a tokenizer (the embedded one may not exist yet: the
    driver builds it)."""
    from model_loading import TOKENIZER_FILES, check_model_path, holds_tokenizer

    if student == EMBEDDED_STUDENT and not Path(student).exists():
        return
    check_model_path(student, "--student")
    folder = Path(student)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"--student: {student} holds no config.json: not a model folder")
    if folder.is_dir() and not holds_tokenizer(folder):
        raise UserError(f"--student: {student} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def table_rows(result: dict) -> list[dict]:
    """The student's row, then each round's row of every arm."""
    rounds = max((len(rows) for rows in result["arms"].values()), default=0)
    return [result["student"]] + [rows[r] for r in range(rounds) for rows in result["arms"].values() if r < len(rows)]


def print_table(result: dict) -> None:
    splits = result["splits"]
    last = splits[-1]
    print("\nround  arm      " + "".join(f"{s[:5] + ' acc':>10}" for s in splits) + f"{last[:5] + ' strict':>13}"
          + "  teacher kept  negatives  cost($)  minutes")
    for row in table_rows(result):
        ev, teacher, exam = row["eval"], row.get("teacher") or {}, row.get("exam") or {}
        print(f"{row['round']:>5}  {row['arm']:<8}" + "".join(f"{ev[s]['acc']:>10.4f}" for s in splits)
              + f"{ev[last]['strict_acc']:>13.4f}  {teacher.get('kept', '-'):>12}  {exam.get('negatives', '-'):>9}  "
              f"{teacher.get('cost_usd', 0.0):>7.4f}  {row.get('seconds', 0) / 60:>7.1f}")
    print("arms: reflect = LM loss + self-reflection triplet loss (the method); lm = LM loss only (plain distillation)")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    student = result["student"]["eval"]
    for color, (arm, rows) in enumerate(result["arms"].items()):
        rounds = [0] + [row["round"] for row in rows]
        for split, style in zip(result["splits"], ("-", "--", ":")):
            accs = [student[split]["acc"]] + [row["eval"][split]["acc"] for row in rows]
            ax.plot(rounds, accs, marker="o", linestyle=style, color=f"C{color}", label=f"{arm}, {split}")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (flexible)")
    ax.set_xticks(range(0, max((len(r) for r in result["arms"].values()), default=0) + 1))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Tailored learning, round by round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
