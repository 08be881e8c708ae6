"""Ask the teacher LLM for rationales: `--mode annotate` (a whole split) or `--mode feedback`
(tailored rationales for the student's wrong ones). The logic lives in teacher.py.

  OPENAI_API_KEY=... python query_teacher.py --task gsm8k --mode annotate --output_dir runs/gsm8k/teacher_r1
  python query_teacher.py --task wordmath --backend offline --mode feedback \
      --student_wrong runs/wordmath/exam_r1/student_wrong.json --output_dir runs/wordmath/teacher_r2
"""
from __future__ import annotations

import sys

import args
import flags
import teacher
from common import cli_main


@cli_main
def main() -> None:
    try:
        teacher.run_collection(flags.parse(args.TeacherArguments))
    except teacher.CollectionFailed as err:  # not bad input (exit 2): the run itself failed
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; replies so far are journaled: re-run the same command to continue",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
