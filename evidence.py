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

Budget of the default run (wordmath, 5 seeds, all arms, 2 CPU cores, offline teacher). Per seed the run makes
  4 exams (of the round-0 student, +reflect, std-cot and +reflect-m1) of --exam_limit questions x 4 samples,
  5 teacher stages (annotate, 3 x feedback, the untailored draw; offline, ~1 s each),
  9 trainings: 4 of round 1 (std-cot, +reflect, +prefer, +reflect-m1) on the round-1 data, 5 of round 2 on round
     1's data plus the new rationales (tailored, tailored-no-reflect, untailored, more-epochs with tailored's
     steps, tailored-m1),
  18 evaluations (9 checkpoints x validation and test, --eval_limit items each),
and the round-0 evaluation once for all seeds. BUDGET has the measured stage times.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from arms import EVIDENCE_ARMS
from common import UserError, atomic_write_json, read_json
from flags import parse
from driver_args import EvidenceArguments
from evidence_report import plot, print_table, summarize
from rounds import RoundDriver
from stage_process import run_jobs, say

BUDGET = """
Measured with the defaults (--annotate_limit 600 --exam_limit 300 --eval_limit 300, 5 seeds, --jobs 2) on the 2-core
machine, 2026-12-08 (bench/RESULTS.md): stages start in a fork of the driver (no per-stage imports), two side by
side at one torch thread each:
  evaluation, 300 items of one split       9-14 s
  exam, 300 questions x 4 samples          20-30 s
  teacher stage (offline)                  1 s
  round 1, 68 steps of 16                  std-cot ~21 s, +reflect ~32 s, +prefer ~32 s, +reflect-m1 ~31 s
  round 2, ~90 steps                       tailored ~47 s, untailored ~44 s, tailored-m1 ~54 s, the others ~25 s
  182 stages in 30.7 min wall (about 6 min per seed).
Earlier: 43.7 min for 3 seeds of 7 arms (2026-11-26, a process per stage), 18.1 min (2026-12-07, forks).
--quick (1 seed, 120 annotated questions, exam 40 x 2 samples, 40 items per split, 12 steps per training):
38 stages of a few seconds each, almost all of it start-up.
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
        # tailored's request count over the questions its exam examined, at random instead of at its mistakes:
        # the same questions, the same number of requests, so only the selection differs
        asked = self.manifest("tailored", r)["teacher"]["requests"]
        return self.teacher("annotate", self.round_dir(arm, r) / "teacher", limit=a.exam_limit,
                            random_questions=max(1, asked), seed=a.seed + UNTAILORED_SEED_OFFSET)

    def planned_rounds(self) -> list[tuple[str, int]]:
        return [(arm, EVIDENCE_ARMS[arm].round) for arm in self.arms if arm != "student"]

    def train_settings(self, arm: str, r: int, planning: bool = False) -> dict:
        spec, a = EVIDENCE_ARMS[arm], self.args
        settings = {"contrastive": spec.contrastive}
        if spec.margin is not None:
            settings["cl_p"] = spec.margin
        if spec.prefer:
            settings.update(cl_loss=a.prefer_loss, cl_beta=a.prefer_beta, cl_gamma=a.prefer_gamma,
                            cl_neg_form=a.prefer_neg_form)
        if spec.data == "same" and planning:
            settings["max_steps"] = 1
        elif spec.data == "same":  # the steps tailored's round trained, read from its trainer's summary
            settings["max_steps"] = read_json(self.round_dir("tailored", r) / "train" / "train_summary.json")["steps"]
        return settings

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
    free = {"seeds", "arms", "bootstrap", "quick", "workdir", "jobs", "dry_run", "lrs", "margins"}  # tune.py: a grid may grow
    settings = {k: v for k, v in asdict(args).items() if k not in free}
    path = root / "settings.json"
    if path.is_file():
        saved = {k: v for k, v in read_json(path).items() if k not in free}
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


def dry_run(args: EvidenceArguments) -> dict:
    """The teacher requests and estimated cost of every seed's teacher stages, sending and writing nothing: round 1's
    annotation exactly (the teacher's own --dry_run on the command the run will give it); each feedback stage at
    its bound, --max_wrong_per_question requests for each examined question, priced on prompts of that size (its
    count is the exam's mistakes, known once the exam ran); untailored asks exactly as many as tailored."""
    import tempfile

    import teacher
    from args import TeacherArguments

    def estimate(argv: list[str]) -> dict:
        summary = teacher.run_collection(parse(TeacherArguments, [*argv[2:], "--dry_run"]))
        return {"requests": summary["requests"]["total"], "from_journal": summary["requests"]["from_journal"],
                **summary["dry_run"]}

    arms = with_dependencies(args.arms.split(","))
    per_seed = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds_of(args):
            driver = ArmDriver(args, seed)
            stages = {"round1/teacher": estimate(driver.teacher_command(
                "annotate", driver.workdir / "round1" / "teacher", None, limit=args.annotate_limit))}
            feedback_arms = [arm for arm in arms if EVIDENCE_ARMS[arm].data == "feedback"]
            if feedback_arms:
                bound = estimate(driver.teacher_command("feedback", Path(scratch) / "teacher",
                                                        worst_exam(args, Path(scratch))))
                for arm in feedback_arms:
                    stages[f"{slug(arm)}/round2/teacher"] = {**bound, "at_most": True}
                if "untailored" in arms:
                    stages["untailored/round2/teacher"] = {**stages["tailored/round2/teacher"], "as_tailored": True}
            per_seed[seed] = stages
    print_dry_run(per_seed)
    return per_seed


def worst_exam(args: EvidenceArguments, folder: Path) -> str:
    """A student_wrong.json with the most a feedback stage can be given: every examined question wrong in
    --max_wrong_per_question distinct ways (the gold solution with its final number changed)."""
    import tasks
    from args import TeacherArguments

    per_question = TeacherArguments.max_wrong_per_question
    examined = tasks.load_split(args.task, "train", args.data_dir, limit=args.exam_limit, valid_size=args.valid_size)
    wrong = {ex.question: [f"{ex.rationale or ''} (attempt {k + 1})" for k in range(per_question)] for ex in examined}
    path = folder / "student_wrong.json"
    atomic_write_json(path, wrong)
    return str(path)


def print_dry_run(per_seed: dict) -> None:
    print("\ndry run: teacher requests per seed (nothing sent, nothing written)")
    total_requests, total_cost, bounded = 0, 0.0, False
    for seed, stages in per_seed.items():
        for stage, est in stages.items():
            bounded |= bool(est.get("at_most") or est.get("as_tailored"))
            how = "at most " if est.get("at_most") or est.get("as_tailored") else ""
            also = " (as many as tailored asks)" if est.get("as_tailored") else ""
            journal = f" ({est['from_journal']} in its journal already)" if est.get("from_journal") else ""
            cost = f"${est['est_cost_usd']:.4f}" if est["prices_known"] else "unknown price"
            print(f"  seed {seed} {stage:<36} {how}{est['requests']:>6} requests{journal}, new: ~{est['est_prompt_tokens']:,} "
                  f"prompt + ~{est['est_completion_tokens']:,} completion tokens, {how}{cost}{also}")
            total_requests += est["requests"]
            total_cost += est["est_cost_usd"]
    how = "at most " if bounded else ""
    print(f"  all seeds: {how}{total_requests} requests, {how}${total_cost:.4f}")


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
