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

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import infer
import infer_student_wrong
import teacher
from args import ExamArguments, InferArguments, TeacherArguments, TrainArguments, to_argv
from common import UserError, atomic_write_json, read_json


class StageFailed(UserError):
    """A stage exited non-zero. The driver exits 1 with this line: the stage's own `error:` line says why."""


class Interrupted(Exception):
    """SIGTERM, SIGINT or SIGHUP reached the driver (see `stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """Turn the stop signals into `Interrupted`, so `run_command` stops the running stage before the
    driver exits (a stage lives in its own process group and would not see them otherwise)."""
    def handler(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


@contextmanager
def driver_exits() -> Iterator[None]:
    """How the drivers (run_rounds.py, reproduce.py) end a run that stops partway, with one `error:` line:
    a failed stage exits 1 (its own error line says why), a stop signal 128 + its number. Finished
    stages are kept either way, so the same command continues."""
    stop_on_signals()
    try:
        yield
    except StageFailed as err:  # the stage's own failure, not bad input to the driver (exit 2)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Interrupted as err:
        print(f"error: stopped by {err} (a running stage with it); finished stages are kept: re-run the same "
              f"command to continue", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)


def _die_with_parent():
    """Linux: the kernel sends the stage SIGTERM when the driver dies, even by SIGKILL (no handler runs then)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone


def stop_stage(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the stage's process group (its torchrun workers too), SIGKILL whatever is left after
    `grace` seconds or at a second signal."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except (subprocess.TimeoutExpired, Interrupted, KeyboardInterrupt):
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _last_error_line(output: bytes) -> str | None:
    lines = [line.strip() for line in output.decode("utf-8", errors="replace").replace("\r", "\n").splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else None


def run_command(argv: list[str], log: Path) -> None:
    """Print the command, run it with output shown and kept in `log`; a failure stops the driver.

    Bytes pass through unchanged so the stage's progress bars redraw in place. The stage runs in
    its own process group, stopped with it if the driver is interrupted."""
    line = "$ " + " ".join(shlex.quote(a) for a in argv)
    print("\n" + line, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    tail = b""
    with open(log, "wb") as sink:
        sink.write((line + "\n").encode())  # the log's first line: the command that made the folder (command_of)
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent())
        try:
            while chunk := process.stdout.read1(4096):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                sink.write(chunk)
                tail = (tail + chunk)[-16384:]
            process.wait()
        except BaseException:
            stop_stage(process)
            raise
        finally:
            process.stdout.close()
    if process.returncode != 0:
        code = process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
        reason = _last_error_line(tail)
        raise StageFailed(f"stage {Path(argv[1]).name if len(argv) > 1 else argv[0]} failed ({how})"
                          + (f": {reason}" if reason else "") + f"; its output is in {log}")


def command_of(log: Path) -> str | None:
    """The command a stage log was written by (run_command's first line), or None."""
    try:
        with open(log, "rb") as f:
            first = f.readline().decode("utf-8", errors="replace").rstrip("\n")
    except OSError:
        return None
    return first[2:] if first.startswith("$ ") else None


def merge_rationale_files(paths: list[str], out: Path) -> None:
    """Union of {question: [text, ...]} files, first-seen order, no duplicate texts."""
    merged: dict[str, list[str]] = {}
    for path in paths:
        for question, texts in read_json(path).items():
            bucket = merged.setdefault(question, [])
            bucket.extend(t for t in texts if t not in bucket)
    atomic_write_json(out, merged)


ARMS = {"reflect": True, "lm": False}  # arm -> trains with the self-reflection (triplet) loss


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
    def command(self, script: str, cls, **values) -> list[str]:
        """`script`'s command line: every driver setting the stage has under the same name, then `values`.
        Built from the stage's own dataclass, so a renamed or invalid flag fails here, before any stage runs."""
        names = {f.name for f in fields(cls)}
        shared = {f.name: getattr(self.args, f.name) for f in fields(self.args) if f.name in names}
        return [self.python, script, *to_argv(cls, **{**shared, **values})]

    def eval_command(self, checkpoint: str, out: Path, split: str) -> list[str]:
        return self.command("infer.py", InferArguments, rationale=True, test_on=split, checkpoint=checkpoint,
                            batch=self.args.eval_batch, limit=self.args.eval_limit, output_dir=str(out))

    def exam_command(self, checkpoint: str, out: Path) -> list[str]:
        a = self.args
        return self.command("infer_student_wrong.py", ExamArguments, rationale=True, test_on="train",
                            checkpoint=checkpoint, batch=a.exam_batch, max_new_tokens=a.exam_max_new_tokens,
                            limit=a.exam_limit, output_dir=str(out))

    def teacher_command(self, mode: str, out: Path, student_wrong: str | None, **extra) -> list[str]:
        return self.command("query_teacher.py", TeacherArguments, mode=mode, test_on="train",
                            num_samples=self.args.teacher_samples, student_wrong=student_wrong, output_dir=str(out),
                            **extra)

    def train_command(self, start_checkpoint: str, teacher_data: str, negatives: str, out: Path,
                      contrastive: bool, **extra) -> list[str]:
        return self.command("run_trainer.py", TrainArguments, checkpoint=start_checkpoint, teacher_data=teacher_data,
                            weight_decay=0.01, contrastive=contrastive, cl_pos_path=teacher_data,
                            cl_neg_path=negatives, merge_losses=True, output_dir=str(out), resume="yes",
                            logging_steps=20, **extra)

    def evaluate(self, checkpoint: str, out: Path, split: str) -> dict:
        if infer.read_result(out) is None:
            run_command(self.eval_command(checkpoint, out, split), out / "log.txt")
        return infer.read_result(out)

    def evaluate_all(self, checkpoint: str, folder: Path) -> dict:
        return {split: self.evaluate(checkpoint, folder / f"eval_{split}", split) for split in self.splits}

    def exam(self, checkpoint: str, out: Path) -> dict:
        if infer_student_wrong.read_summary(out) is None:
            run_command(self.exam_command(checkpoint, out), out / "log.txt")
        return infer_student_wrong.read_summary(out)

    def teacher(self, mode: str, out: Path, student_wrong: str | None = None, **extra) -> dict:
        if teacher.read_summary(out) is None:
            run_command(self.teacher_command(mode, out, student_wrong, **extra), out / "log.txt")
        return teacher.read_summary(out)

    def train(self, start_checkpoint: str, teacher_data: str, negatives: str, out: Path, contrastive: bool,
              **extra) -> str:
        final = out / "final"
        if not (final / "run_args.json").is_file():
            run_command(self.train_command(start_checkpoint, teacher_data, negatives, out, contrastive, **extra),
                        out / "log.txt")
        return str(final)

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
            return self.teacher("annotate", self.workdir / "round1" / "teacher")
        return self.teacher("feedback", self.round_dir(arm, r) / "teacher", exam["student_wrong"])

    def train_settings(self, arm: str, r: int) -> dict:
        """Training flags of this arm's round beyond the driver's own (at least `contrastive`)."""
        return {"contrastive": ARMS[arm]}

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

    def run(self) -> dict:
        a = self.args
        for r in range(1, a.start_round):  # before any work: a bad --start_round costs nothing
            for arm in self.arms:
                manifest = self.round_dir(arm, r) / "manifest.json"
                if not manifest.is_file():
                    raise UserError(f"--start_round {a.start_round}: round {r} of arm {arm} has no {manifest}; "
                                    f"run it first")
        student = {"round": 0, "arm": "student", "eval": self.evaluate_all(a.student, self.workdir / "round0"),
                   "teacher": None, "exam": None}
        rows: dict[str, list[dict]] = {arm: [] for arm in self.arms}
        for r in range(1, a.rounds + 1):
            for arm in self.arms:
                if r < a.start_round:
                    rows[arm].append(read_json(self.round_dir(arm, r) / "manifest.json"))
                    continue
                print(f"\n===== round {r}, arm {arm} =====", flush=True)
                rows[arm].append(self.run_round(arm, r))
        result = {"splits": self.splits, "student": student, "arms": rows}
        atomic_write_json(self.workdir / "rounds.json", result)
        print_table(result)
        plot(result, self.workdir / "rounds.png")
        return result


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
