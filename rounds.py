"""The round driver: exam -> teacher -> training -> evaluation, round after round.

Every stage is an ordinary command of this repo (printed before it runs, so any stage can be
re-run by hand) writing into `<workdir>/round<r>/<stage>/`. A stage whose outputs exist is
skipped, so an interrupted run continues where it stopped; each round's manifest.json records
inputs, outputs, teacher model, template hash, counts, accuracy and wall time.

Round 1: teacher annotation of the train split + exam of the round-0 student -> training from
round 0. Round r >= 2: exam of the round r-1 student -> tailored feedback on its mistakes ->
training from the round r-1 checkpoint (with earlier rounds' data too if --keep_previous_data).
"""
from __future__ import annotations

import glob
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import UserError, atomic_write_json, read_json


def run_command(argv: list[str], log: Path) -> None:
    """Print the command, run it with output shown and kept in `log`; a failure stops the driver.

    Bytes pass through unchanged so the stage's progress bars redraw in place."""
    print("\n$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := process.stdout.read1(4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            sink.write(chunk)
        if process.wait() != 0:
            raise UserError(f"stage failed (exit {process.returncode}); its output is in {log}")


def merge_rationale_files(paths: list[str], out: Path) -> None:
    """Union of {question: [text, ...]} files, first-seen order, no duplicate texts."""
    merged: dict[str, list[str]] = {}
    for path in paths:
        for question, texts in read_json(path).items():
            bucket = merged.setdefault(question, [])
            bucket.extend(t for t in texts if t not in bucket)
    atomic_write_json(out, merged)


def latest_accuracy_file(folder: Path) -> Path | None:
    files = sorted(glob.glob(str(folder / "Acc*.json")), key=lambda p: Path(p).stat().st_mtime)
    return Path(files[-1]) if files else None


class RoundDriver:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.python = sys.executable

    # ------------------------------------------------------------ stages (each a command)
    def common_flags(self) -> list[str]:
        a = self.args
        flags = ["--task", a.task, "--data_dir", a.data_dir, "--device", a.device, "--seed", str(a.seed)]
        return flags + (["--fewshot", "yes"] if a.fewshot else [])

    def evaluate(self, checkpoint: str, out: Path) -> dict:
        found = latest_accuracy_file(out)
        if found is None:
            argv = [self.python, "infer.py", *self.common_flags(), "--rationale", "--test_on", self.args.eval_split,
                    "--checkpoint", checkpoint, "--batch", str(self.args.eval_batch), "--output_dir", str(out)]
            if self.args.eval_limit:
                argv += ["--limit", str(self.args.eval_limit)]
            run_command(argv, out / "log.txt")
            found = latest_accuracy_file(out)
        result = read_json(found)
        return {"acc": result["acc"], "strict_acc": result["strict_acc"], "correct": result["correct"],
                "total": result["total"], "file": str(found)}

    def exam(self, checkpoint: str, out: Path) -> dict:
        if not (out / "summary.json").is_file():
            a = self.args
            argv = [self.python, "infer_student_wrong.py", *self.common_flags(), "--rationale", "--test_on", "train",
                    "--checkpoint", checkpoint, "--batch", str(a.exam_batch), "--sample_num", str(a.sample_num),
                    "--max_new_tokens", str(a.exam_max_new_tokens), "--output_dir", str(out)]
            if a.exam_limit:
                argv += ["--limit", str(a.exam_limit)]
            run_command(argv, out / "log.txt")
        summary = read_json(out / "summary.json")
        return {"student_wrong": str(out / "student_wrong.json"), "accuracy": summary["accuracy"],
                "questions_with_mistakes": summary["questions_with_mistakes"],
                "negatives": summary["wrong_rationales"]}

    def teacher(self, mode: str, out: Path, student_wrong: str | None = None) -> dict:
        if not (out / "summary.json").is_file() or not (out / "teacher_data.json").is_file():
            a = self.args
            argv = [self.python, "query_teacher.py", "--mode", mode, "--task", a.task, "--data_dir", a.data_dir,
                    "--test_on", "train", "--backend", a.backend, "--teacher_model", a.teacher_model,
                    "--num_samples", str(a.teacher_samples), "--output_dir", str(out), "--seed", str(a.seed)]
            if a.base_url:
                argv += ["--base_url", a.base_url]
            if student_wrong:
                argv += ["--student_wrong", student_wrong]
            if a.max_cost:
                argv += ["--max_cost", str(a.max_cost)]
            run_command(argv, out / "log.txt")
        summary = read_json(out / "summary.json")
        return {"teacher_data": str(out / "teacher_data.json"), "template_hash": summary.get("template_hash"),
                "model": summary.get("model"), "kept": summary["samples"]["kept"],
                "rejected": summary["samples"]["rejected"], "cost_usd": summary["cost_usd"]["all_requests"]}

    def train(self, start_checkpoint: str, teacher_data: str, negatives: str, out: Path) -> str:
        final = out / "final"
        if not (final / "run_args.json").is_file():
            a = self.args
            argv = [self.python, "run_trainer.py", *self.common_flags(), "--checkpoint", start_checkpoint,
                    "--teacher_data", teacher_data, "--epoch", str(a.epoch), "--train_bsz", str(a.train_bsz),
                    "--lr", str(a.lr), "--warmup_steps", str(a.warmup_steps), "--weight_decay", "0.01",
                    "--contrastive", "yes" if a.contrastive else "no", "--cl_pos_path", teacher_data,
                    "--cl_neg_path", negatives, "--cl_ratio", str(a.cl_ratio), "--merge_losses", "yes",
                    "--output_dir", str(out), "--resume", "yes", "--logging_steps", "20"]
            if a.bf16:
                argv += ["--bf16", "yes"]
            if a.deepspeed:
                argv += ["--deepspeed", a.deepspeed]
            if a.max_steps > 0:
                argv += ["--max_steps", str(a.max_steps)]
            run_command(argv, out / "log.txt")
        return str(final)

    # ------------------------------------------------------------ rounds
    def round_dir(self, r: int) -> Path:
        return self.workdir / f"round{r}"

    def checkpoint_of(self, r: int) -> str:
        if r == 0:
            return self.args.student
        manifest = self.round_dir(r) / "manifest.json"
        return read_json(manifest)["checkpoint"]

    def run_round(self, r: int) -> dict:
        started = time.time()
        folder = self.round_dir(r)
        previous = self.checkpoint_of(r - 1)
        manifest = {"round": r, "task": self.args.task, "start_checkpoint": previous, "backend": self.args.backend}
        # wall time adds up over interrupted runs; a re-run that skips every stage adds ~nothing
        earlier_seconds = read_json(folder / "manifest.json").get("seconds", 0) if (folder / "manifest.json").is_file() else 0
        exam = self.exam(previous, folder / "exam")
        if r == 1:
            teacher = self.teacher("annotate", folder / "teacher")
        else:
            teacher = self.teacher("feedback", folder / "teacher", exam["student_wrong"])
        teacher_data, negatives = teacher["teacher_data"], exam["student_wrong"]
        if self.args.keep_previous_data and r > 1:  # the previous round's inputs already hold the ones before
            earlier = read_json(self.round_dir(r - 1) / "manifest.json")["train_inputs"]
            teacher_data = str(folder / "train_teacher_data.json")
            negatives = str(folder / "train_negatives.json")
            merge_rationale_files([earlier["teacher_data"], teacher["teacher_data"]], Path(teacher_data))
            merge_rationale_files([earlier["negatives"], exam["student_wrong"]], Path(negatives))
        checkpoint = self.train(previous, teacher_data, negatives, folder / "train")
        evaluation = self.evaluate(checkpoint, folder / "eval")
        manifest.update(exam=exam, teacher=teacher, train_inputs={"teacher_data": teacher_data, "negatives": negatives},
                        checkpoint=checkpoint, eval=evaluation,
                        seconds=round(earlier_seconds + time.time() - started, 1))
        atomic_write_json(folder / "manifest.json", manifest)
        return manifest

    def run(self) -> list[dict]:
        a = self.args
        rows = [{"round": 0, "eval": self.evaluate(a.student, self.round_dir(0) / "eval"), "teacher": None, "exam": None}]
        for r in range(1, a.rounds + 1):
            if r < a.start_round:
                manifest = self.round_dir(r) / "manifest.json"
                if not manifest.is_file():
                    raise UserError(f"--start_round {a.start_round}: round {r} has no {manifest}; run it first")
                rows.append(read_json(manifest))
                continue
            print(f"\n===== round {r} =====", flush=True)
            rows.append(self.run_round(r))
        atomic_write_json(self.workdir / "rounds.json", rows)
        print_table(rows)
        plot(rows, self.workdir / "rounds.png")
        return rows


def print_table(rows: list[dict]) -> None:
    print("\nround  accuracy  strict    teacher kept  negatives  cost($)  minutes")
    for row in rows:
        ev, teacher, exam = row["eval"], row.get("teacher") or {}, row.get("exam") or {}
        print(f"{row['round']:>5}  {ev['acc']:>8.4f}  {ev['strict_acc']:>6.4f}  {teacher.get('kept', '-'):>12}  "
              f"{exam.get('negatives', '-'):>9}  {teacher.get('cost_usd', 0.0):>7.4f}  "
              f"{row.get('seconds', 0) / 60:>7.1f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rounds, [row["eval"]["acc"] for row in rows], marker="o", label="accuracy (flexible)")
    ax.plot(rounds, [row["eval"]["strict_acc"] for row in rows], marker="s", linestyle="--", label="accuracy (strict)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Tailored learning, round by round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
