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

import sys
from pathlib import Path

from common import UserError, cli_main
from driver_args import EMBEDDED_STUDENT, RoundsArguments
from flags import parse
from rounds import RoundDriver
from stage_process import driver_exits, run_command
from tasks import TASKS


def prepare_embedded(args: RoundsArguments, student: bool = True) -> None:
    """The embedded default needs its data and its round-0 student. The data is made once and never overwritten
    (a user who generated it with other difficulty settings keeps it); the student is rebuilt when its build
    settings, the prompt format or the train data changed."""
    logs = Path(args.workdir) / "setup"
    task_dir = Path(args.data_dir) / args.task
    if TASKS[args.task].generator and not all((task_dir / f"{split}.jsonl").is_file()
                                               for split in ("train", "validation", "test")):
        run_command([sys.executable, "prepare_data.py", "--task", args.task, "--data_dir", args.data_dir],
                    logs / "prepare_data.log")
    if not student or args.student != EMBEDDED_STUDENT:
        return
    # build_student.py skips the build when the folder holds one of these settings, prompt format and train data
    # (a student warm-started on other data or another prompt format would start every round off them)
    run_command([sys.executable, "build_student.py", "--task", "wordmath", "--data_dir", args.data_dir,
                 "--out", args.student, "--warm_steps", str(args.warm_steps)], logs / "build_student.log")


def check_learning_rate(args: RoundsArguments, argv: list[str]) -> None:
    """The default rate and triplet margin were tuned for the embedded 0.9M student: a real model must be given
    its own (tune.py chooses both on validation), so neither carries over silently."""
    given = {a.split("=", 1)[0] for a in argv}
    if args.student != EMBEDDED_STUDENT:
        if not given & {"--lr", "--learning_rate"}:
            raise UserError(f"--lr: required with --student {args.student} (the default {args.learning_rate:g} was tuned "
                            f"for the embedded 0.9M student; the paper trained GPT-J-6B at 7e-6; tune.py chooses it on "
                            f"validation)")
        if not given & {"--cl_p"}:
            raise UserError(f"--cl_p: required with --student {args.student} (the triplet margin; the default "
                            f"{args.cl_p:g} was tuned for the embedded 0.9M student, the paper used 1.0; tune.py chooses "
                            f"it on validation)")
    print(f"student {args.student}: learning rate {args.learning_rate:g}, triplet margin {args.cl_p:g}, batch "
          f"{args.per_device_train_batch_size} per process, {args.num_train_epochs:g} epoch(s) per round", flush=True)


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
