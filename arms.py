"""The arms: what each one trains, and on what it builds. The single source of arm names: `--arms` of
run_rounds.py and reproduce.py, the round driver and the evidence harness all read these tables.

Two families:
- the round driver's arms (`DRIVER_ARMS`) train every round side by side from the same round-0 student;
- the evidence harness's arms (`EVIDENCE_ARMS`) are one round each, on top of the arm they continue from:
  student               round 0: the warm-started student, no training (shared by every seed)
  std-cot               round 1: teacher rationales for the train split, LM loss only (classic distillation)
  +reflect              round 1: as std-cot, plus the self-reflection (triplet) loss on the student's exam mistakes
  +prefer               round 1: as +reflect with a reference-free preference loss (--prefer_loss) instead of the triplet
  +reflect-m1           round 1: as +reflect at the paper's triplet margin 1.0 instead of the validation-tuned --cl_p
  tailored              round 2 after +reflect: feedback on the round-1 student's mistakes, with self-reflection (the method)
  tailored-no-reflect   round 2 after std-cot: feedback on its mistakes, LM loss only
  untailored            round 2 after +reflect: as many teacher requests as `tailored` made, at random over the questions
                        the same exam examined (at most 2 each, as feedback), instead of at the mistakes
  more-epochs           round 2 after +reflect: round 1's data again, for as many steps as `tailored` trained
  tailored-m1           round 2 after +reflect-m1: as tailored, at the paper's margin 1.0
Kept free of torch and the stages' code: the flags are checked against it before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass

from common import UserError


@dataclass(frozen=True)
class Arm:
    contrastive: bool = False                   # self-reflection term on (triplet, or the preference loss)
    round: int | None = None                    # the one round this arm trains; None: every round (driver arms)
    parent: str | None = None                   # the arm whose checkpoint this one continues (round - 1)
    data: str = "annotate"                      # annotate | feedback | random | same (evidence.ArmDriver.collect)
    prefer: bool = False                        # the preference loss instead of the triplet
    needs: tuple[str, ...] = ()                 # arms whose outputs size this one (untailored, more-epochs)
    margin: float | None = None                 # the triplet margin (--cl_p); None: the run's own
    describe: str = ""


PAPER_MARGIN = 1.0  # the original's --cl_p

DRIVER_ARMS: dict[str, Arm] = {
    "lm": Arm(False, describe="LM loss only: the control"),
    "reflect": Arm(True, describe="LM + self-reflection (triplet) loss: the method"),
}

# In the order they run in: each after its parent and needs.
EVIDENCE_ARMS: dict[str, Arm] = {
    "student": Arm(round=0, describe="round-0 student, no training"),
    "std-cot": Arm(False, 1, "student", describe="teacher rationales for the train split, LM loss only"),
    "+reflect": Arm(True, 1, "student", describe="std-cot + self-reflection (triplet) on the student's mistakes"),
    "+prefer": Arm(True, 1, "student", prefer=True, describe="std-cot + a preference loss on the same pairs"),
    "+reflect-m1": Arm(True, 1, "student", margin=PAPER_MARGIN, describe="+reflect at the paper's triplet margin 1.0"),
    "tailored": Arm(True, 2, "+reflect", "feedback", describe="feedback on +reflect's mistakes, with self-reflection"),
    "tailored-no-reflect": Arm(False, 2, "std-cot", "feedback", describe="feedback on std-cot's mistakes, LM loss only"),
    "untailored": Arm(True, 2, "+reflect", "random", needs=("tailored",),
                      describe="as many teacher requests as tailored, for random questions of the same exam"),
    "more-epochs": Arm(True, 2, "+reflect", "same", needs=("tailored",),
                       describe="round 1's data again, for tailored's number of steps"),
    "tailored-m1": Arm(True, 2, "+reflect-m1", "feedback", margin=PAPER_MARGIN,
                       describe="tailored at the paper's triplet margin 1.0, after +reflect-m1"),
}


def check_arms(flag_value: str, table: dict[str, Arm]) -> None:
    """--arms: a comma list of distinct names of `table`."""
    arms = flag_value.split(",")
    if not arms or any(arm not in table for arm in arms) or len(set(arms)) != len(arms):
        raise UserError(f"--arms: expected a comma list of {', '.join(table)}, got {flag_value!r}")
