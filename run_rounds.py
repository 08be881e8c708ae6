"""Run the tailored-learning loop: exam -> teacher -> training -> evaluation, for several rounds.

    python run_rounds.py                      # the embedded demo: offline, CPU (README: its time on 2 cores)
    python run_rounds.py --task gsm8k --student EleutherAI/gpt-j-6B --backend openai \
        --teacher_model gpt-3.5-turbo --device 0,1,2,3,4,5,6,7 --deepspeed ds_stage3_config.json \
        --lr 7e-6 --train_bsz 2 --epoch 10 --fewshot yes --exam_limit 0 --annotate_limit 0 --eval_limit 0 \
        --exam_batch 8 --eval_batch 32 --workdir runs/gsm8k
With the default embedded student and task it first prepares the data and builds the student. The sizes
(--annotate_limit, --exam_limit, --eval_limit) and batches default to the demo's; a real run sets them.
On a CPU two stages run side by side (--jobs), each started in a fork of the driver (stage_process.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common import UserError, cli_main
from driver_args import EMBEDDED_STUDENT, RoundsArguments
from flags import parse
from rounds import RoundDriver
from stage_process import driver_exits, run_command
from tasks import PROMPT_FORMAT, TASKS


def prepare_embedded(args: RoundsArguments) -> None:
    """The embedded default needs its data and its round-0 student: made once, never overwritten
    (a user who generated the data with other difficulty settings keeps it)."""
    logs = Path(args.workdir) / "setup"
    task_dir = Path(args.data_dir) / args.task
    if TASKS[args.task].generator and not all((task_dir / f"{split}.jsonl").is_file()
                                               for split in ("train", "validation", "test")):
        run_command([sys.executable, "prepare_data.py", "--task", args.task, "--data_dir", args.data_dir],
                    logs / "prepare_data.log")
    info = Path(args.student) / "build_info.json"
    # a student warm-started on an older prompt format would start every round off its own format
    stale = info.is_file() and json.loads(info.read_text()).get("settings", {}).get("prompt_format") != PROMPT_FORMAT
    if args.student == EMBEDDED_STUDENT and (stale or not info.is_file()):
        run_command([sys.executable, "build_student.py", "--task", "wordmath", "--data_dir", args.data_dir,
                     "--out", args.student, "--warm_steps", str(args.warm_steps)] + ["--force"] * stale,
                    logs / "build_student.log")


def check_learning_rate(args: RoundsArguments, argv: list[str]) -> None:
    """The default rate was tuned for the embedded 0.9M student: a real model must be given its own."""
    given = any(a.split("=", 1)[0] in ("--lr", "--learning_rate") for a in argv)
    if args.student != EMBEDDED_STUDENT and not given:
        raise UserError(f"--lr: required with --student {args.student} (the default {args.learning_rate:g} was tuned for "
                        f"the embedded 0.9M student; the paper trained GPT-J-6B at 7e-6)")
    print(f"student {args.student}: learning rate {args.learning_rate:g}, batch {args.per_device_train_batch_size} "
          f"per process, {args.num_train_epochs:g} epoch(s) per round", flush=True)


@cli_main
def main() -> None:
    with driver_exits():
        args = parse(RoundsArguments)
        check_learning_rate(args, sys.argv[1:])
        driver = RoundDriver(args)
        driver.preflight()  # every stage's settings and inputs, before anything is written
        prepare_embedded(args)
        driver.run()


if __name__ == "__main__":
    main()
