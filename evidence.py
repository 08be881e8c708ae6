"""Evidence for the method's claims: named arms over seeds, one table (reproduce.py is the script).

Arms: `arms.EVIDENCE_ARMS`, each one round of training on top of the arm it continues from.

Every stage is the round driver's (rounds.RoundDriver: the same commands, the same skip-if-done outputs and
manifests); `ArmDriver` only says, per arm, which checkpoint a round starts from, which exam and teacher
stage feed it and which training flags differ. Layout: `<workdir>/round0/` (round-0 evaluation, greedy, so
shared by the seeds), `<workdir>/seed<s>/` (one round-driver folder per seed: `round1/{exam,teacher}` shared
by the round-1 arms, `<arm>/round<r>/...`, `<arm>/round<r>/next_exam/` the exam of that arm's checkpoint,
shared by the arms continuing from it), then `results.json` and `evidence.png`. A killed run re-run skips
every finished stage. Seeds vary data order, exam sampling, the offline teacher's phrasing and the
untailored draw; nothing reads the test split except the final evaluations.

Budget of the default run (wordmath, 3 seeds, all arms, 2 CPU cores, offline teacher). Per seed the run makes
  3 exams (of the round-0 student, +reflect and std-cot) of --exam_limit questions x 4 samples,
  4 teacher stages (annotate, 2 x feedback, the untailored draw; offline, ~2 s each),
  7 trainings: 3 of round 1 (std-cot, +reflect, +prefer) on the round-1 data, 4 of round 2 on round 1's data
     plus the new rationales (tailored, tailored-no-reflect, untailored, more-epochs with tailored's steps),
  14 evaluations (7 checkpoints x validation and test, --eval_limit items each),
and the round-0 evaluation once for all seeds. BUDGET has the measured stage times and the arithmetic.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from arms import EVIDENCE_ARMS
from common import UserError, atomic_write_json, read_json
from driver_args import EvidenceArguments
from evidence_report import plot, print_table, summarize
from rounds import RoundDriver
from stage_process import run_jobs, say

BUDGET = """
Measured on the 2-core machine while other jobs shared it, so in CPU seconds of each stage at one torch
thread (what its wall time is on one free core; with two threads, two jobs on 2 cores ran 4-9x slower,
hence one thread each while two stages run side by side). One seed at --annotate_limit 800 --exam_limit 200 --eval_limit 300:
  evaluation, 300 items of one split       13-26 s, mean 19 s (about 7 s of it: start-up, model load)
  exam, 200 questions x 4 samples          37-44 s
  teacher stage (offline)                  2 s
  round 1, 96 steps of 16 (1525 rows)      std-cot 60 s, +reflect 83 s, +prefer 86 s
  round 2, 138-140 steps (~2230 rows)      tailored 213 s (half its rows have a triplet), tailored-no-reflect
                                           100 s, untailored 109 s, more-epochs 91 s
  one seed: 1136 s; three: 57 min, plus the round-0 evaluation (37 s) and the harness (~1 min): too
  close to 60 min on a shared machine.
The defaults, --annotate_limit 600 --exam_limit 150 --eval_limit 300, shrink round 1 to ~1140 rows (72 steps)
and the feedback to ~280 requests (round 2: ~1680 rows, ~105 steps):
  round 1   exam 32 + teacher 2 + trainings 47 + 65 + 68 + 6 evaluations x 19          = 328 s
  round 2   2 exams x 32 + 3 teachers x 2 + trainings 162 + 77 + 86 + 71 + 8 x 19     = 618 s
  one seed 946 s; three seeds 2838 s + 37 s + ~60 s = ~49 min, ~18% under the 60 min budget.
Measured with these defaults on the idle 2-core machine (2026-11-26, bench/RESULTS.md): 43.7 min wall: 14.1-14.4 min
of stages per seed, plus the round-0 evaluation and the harness. Since 2026-12-07 stages start in a fork of the
driver (no per-stage imports) and two run side by side (--jobs 2): 18.1 min wall for the same 86 stages.
--quick (1 seed, 120 annotated questions, exam 40 x 2 samples, 40 items per split, 12 steps per training):
26 stages of ~6-10 s each, almost all of it start-up.
"""


# --quick: sizes for an end-to-end run of a few minutes (flags given on the command line still win).
QUICK = {"seeds": 1, "exam_limit": 40, "num_return_sequences": 2, "exam_max_new_tokens": 96, "eval_limit": 40,
         "annotate_limit": 120, "max_steps": 12, "warmup_steps": 2, "bootstrap": 200, "workdir": "runs/evidence_quick"}

# Asking the offline teacher again about a question it annotated in round 1 would return the very same
# texts (it is a function of the request, whose key holds the seed): the untailored arm's requests get a
# seed of their own, as a real teacher sampled at temperature > 0 would give fresh rationales.
UNTAILORED_SEED_OFFSET = 1_000_003


def slug(arm: str) -> str:
    return arm.lstrip("+")


def with_dependencies(arms: list[str]) -> list[str]:
    """The arms asked for and every arm they build on, in EVIDENCE_ARMS order."""
    wanted: set[str] = set()

    def add(arm: str | None) -> None:
        if arm and arm not in wanted:
            wanted.add(arm)
            add(EVIDENCE_ARMS[arm].parent)
            for needed in EVIDENCE_ARMS[arm].needs:
                add(needed)

    for arm in arms:
        add(arm)
    return [arm for arm in EVIDENCE_ARMS if arm in wanted]


def seeds_of(args: EvidenceArguments) -> list[int]:
    return [args.seed + k for k in range(args.seeds)]


# ---------------------------------------------------------------- one seed: the round driver, arm by arm

class ArmDriver(RoundDriver):
    """One seed's arms through the round driver's stages: `run_round` as it is, with each arm's
    parent, exam, teacher stage and training flags taken from EVIDENCE_ARMS."""

    def __init__(self, args: EvidenceArguments, seed: int):
        super().__init__(replace(args, seed=seed, workdir=str(Path(args.workdir) / f"seed{seed}")))

    def round_dir(self, arm: str, r: int) -> Path:
        return self.workdir / slug(arm) / f"round{r}"

    def parent_arm(self, arm: str, r: int) -> str:
        return EVIDENCE_ARMS[arm].parent

    def exam_dir(self, arm: str, r: int) -> Path:
        """Round 1: the round-0 student's shared exam. Later: the exam of the parent's checkpoint, shared
        by every arm continuing from it (tailored and untailored see the same mistakes). `same` re-uses
        its parent's inputs: that exam is finished by then, so nothing runs."""
        spec = EVIDENCE_ARMS[arm]
        if r == 1 or spec.data == "same":
            return super().exam_dir(arm, 1)
        return self.round_dir(spec.parent, r - 1) / "next_exam"

    def collect(self, arm: str, r: int, exam: dict) -> dict:
        spec, a = EVIDENCE_ARMS[arm], self.args
        if spec.data in ("annotate", "same"):  # round 1's annotation, made once per seed
            return self.teacher("annotate", self.workdir / "round1" / "teacher", limit=a.annotate_limit)
        if spec.data == "feedback":
            return super().collect(arm, r, exam)
        asked = self.manifest("tailored", r)["teacher"]["requests"]
        return self.teacher("annotate", self.round_dir(arm, r) / "teacher", limit=a.annotate_limit,
                            random_questions=min(asked, self.train_size()), seed=a.seed + UNTAILORED_SEED_OFFSET)

    def planned_rounds(self) -> list[tuple[str, int]]:
        return [(arm, EVIDENCE_ARMS[arm].round) for arm in self.arms if arm != "student"]

    def train_settings(self, arm: str, r: int, planning: bool = False) -> dict:
        spec, a = EVIDENCE_ARMS[arm], self.args
        settings = {"contrastive": spec.contrastive}
        if spec.prefer:
            settings.update(cl_loss=a.prefer_loss, cl_beta=a.prefer_beta, cl_gamma=a.prefer_gamma,
                            cl_neg_form=a.prefer_neg_form)
        if spec.data == "same" and planning:
            settings["max_steps"] = 1
        elif spec.data == "same":  # the steps tailored's round trained, read from its trainer's summary
            settings["max_steps"] = read_json(self.round_dir("tailored", r) / "train" / "train_summary.json")["steps"]
        return settings

    def train_size(self) -> int:
        import tasks

        n = len(tasks.load_split(self.args.task, "train", self.args.data_dir, valid_size=self.args.valid_size))
        return min(n, self.args.annotate_limit or n)

    def manifest(self, arm: str, r: int) -> dict:
        return read_json(self.round_dir(arm, r) / "manifest.json")

    def done(self, arm: str) -> bool:
        return (self.round_dir(arm, EVIDENCE_ARMS[arm].round) / "manifest.json").is_file()

    def run_arm(self, arm: str) -> dict:
        r = EVIDENCE_ARMS[arm].round
        if not self.done(arm):
            say(f"\n===== seed {self.args.seed}, arm {arm} (round {r}) =====")
            return self.run_round(arm, r)
        return self.manifest(arm, r)


# ---------------------------------------------------------------- the whole run

def check_workdir(args: EvidenceArguments, root: Path) -> None:
    """A workdir holds the stages of one set of settings: finished stages are skipped, so other settings
    would silently mix with them. Seeds, arms and the bootstrap may change between runs."""
    free = {"seeds", "arms", "bootstrap", "quick", "workdir", "jobs"}
    settings = {k: v for k, v in asdict(args).items() if k not in free}
    path = root / "settings.json"
    if path.is_file():
        saved = read_json(path)
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            shown = ", ".join(f"--{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
            raise UserError(f"--workdir {root} holds a run with other settings ({shown}); use another --workdir "
                            f"or the same flags")
    else:
        atomic_write_json(path, settings)


def preflight(args: EvidenceArguments) -> None:
    """Every seed's stages, checked before the first (rounds.RoundDriver.preflight)."""
    for seed in seeds_of(args):
        ArmDriver(args, seed).preflight()


def run(args: EvidenceArguments) -> dict:
    started = time.time()
    root = Path(args.workdir)
    check_workdir(args, root)
    arms = with_dependencies(args.arms.split(","))
    seeds = seeds_of(args)
    drivers = {seed: ArmDriver(args, seed) for seed in seeds}
    # Each (seed, arm) after the arms it builds on; jobs start in this order, so with --jobs 1 the run goes
    # seed by seed (a run stopped early has whole seeds) and with more the next seed's arms fill idle cores.
    jobs = {"student": (lambda: drivers[seeds[0]].evaluate_all(args.student, root / "round0"), ())}
    for seed in seeds:
        for arm in arms:
            if arm != "student":
                needs = tuple((seed, dep) for dep in (EVIDENCE_ARMS[arm].parent, *EVIDENCE_ARMS[arm].needs) if dep != "student")
                jobs[seed, arm] = (lambda seed=seed, arm=arm: drivers[seed].run_arm(arm), needs)
    done = run_jobs(jobs, args.jobs)
    manifests: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            manifests[arm][seed] = ({"round": 0, "arm": "student", "eval": done["student"], "teacher": None,
                                     "seconds": 0} if arm == "student" else done[seed, arm])
    result = summarize(args, arms, seeds, manifests, drivers)
    result["minutes"] = round((time.time() - started) / 60, 2)
    atomic_write_json(root / "results.json", result)
    print_table(result)
    plot(result, root / "evidence.png")
    print(f"\nevery number: {root / 'results.json'} ({result['minutes']:.1f} min this run)")
    return result
