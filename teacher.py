"""The teacher: asks an LLM (or an offline stand-in) for rationales, keeps the correct ones.

Two request kinds (see teacher_templates.py): `annotate` a train question, or give tailored
`feedback` on one of the student's wrong rationales. Every completed request is appended to
a journal before anything uses it, so a re-run asks nothing twice and a killed run loses only
the requests in flight. The outputs (teacher data in the SPEC §4 seed format, provenance,
summary) are always rebuilt from the journal, so they do not depend on what was interrupted.

Round drivers call `run_collection(TeacherArguments(...))`; `query_teacher.py` is the CLI.
"""
from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import tasks
from common import UserError, atomic_write_json, atomic_write_jsonl, read_json, redact
from tasks import Example, TaskSpec
from teacher_backends import Backend, api_key_for, check_base_url, make_backend, public_url
from teacher_collect import Budget, Collector, Health, Outputs, RetryPolicy, build_outputs
from teacher_journal import (OFFLINE_MODEL, Journal, Prices, Request, estimate_tokens, load_price_table, prompt_text,
                             request_key, resolve_prices)
from teacher_templates import render, template_hash

OUTPUT_FILES = ("teacher_data.json", "teacher_provenance.jsonl", "summary.json", "journal.jsonl")


# ---------------------------------------------------------------- building requests

def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def check_text(text: str, where: str) -> None:
    """A lone surrogate (JSON "\\ud800") passes json.loads but breaks every UTF-8 write and hash later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{where}: contains a lone surrogate {text[err.start]!r} at character {err.start} "
                        f"(not valid Unicode text; fix or drop it)") from None


def load_student_wrong(path: str | None, examples: list[Example], skip_unknown: bool,
                       per_question: int) -> tuple[list[tuple[Example, str]], list[str]]:
    """(example, wrong rationale) pairs in dataset order, and the questions not in the split."""
    if not path:
        raise UserError("--mode feedback needs --student_wrong path/to/student_wrong.json")
    data = read_json(path, "--student_wrong file")
    where = f"--student_wrong: {path}"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected {{question: [wrong rationale, ...]}}, got {_json_kind(data)}")
    if not data:
        raise UserError(f"{where}: holds no questions (an exam without mistakes?), so there is nothing to ask "
                        f"the teacher")
    wanted: dict[str, list[str]] = {}
    for question, rationales in data.items():
        check_text(question, f"{where}: a question")
        if not question.strip():
            raise UserError(f"{where}: a question is empty or blank ({question!r})")
        at = f"{where}: question {question[:80]!r}"
        if not isinstance(rationales, list):
            raise UserError(f"{at}: expected a list of wrong rationales, got {_json_kind(rationales)}")
        for rationale in rationales:
            if not isinstance(rationale, str):
                raise UserError(f"{at}: expected wrong rationales as strings, got {_json_kind(rationale)}")
            check_text(rationale, f"{at}: a wrong rationale")
        # keys that differ only in whitespace are one question: their rationales go together
        wanted.setdefault(tasks.fold(question), []).extend(rationales)
    if not any(r.strip() for rationales in wanted.values() for r in rationales):
        raise UserError(f"{where}: every wrong rationale in it is blank, so there is nothing to ask the teacher")
    by_text = {tasks.fold(ex.question): ex for ex in examples}
    unknown = [q for q in data if tasks.fold(q) not in by_text]
    if unknown and not skip_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"{where}: question not in the split: {unknown[0][:120]!r}{more}; "
                        f"pass --skip_unknown_questions to skip such questions")
    pairs = []
    for ex in examples:
        unique = list(dict.fromkeys(tasks.fold(r) for r in wanted.get(tasks.fold(ex.question), []) if r.strip()))
        pairs += [(ex, wrong) for wrong in unique[:per_question]]
    if not pairs:
        raise UserError(f"{where}: none of its questions with a wrong rationale is in the split "
                        f"({len(unknown)} skipped by --skip_unknown_questions), so there is nothing to ask the teacher")
    return pairs, unknown


def build_requests(task: TaskSpec, backend: Backend, jobs: list[tuple[Example, str | None]],
                   kind: str, repeats: list[int] | None = None) -> list[Request]:
    """repeats[i] > 0: the i-th job asks its question again, as a fresh request (its own key, so a seeded
    or sampling teacher writes new rationales instead of the journal answering it)."""
    requests, seen = [], set()
    for i, (ex, wrong) in enumerate(jobs):
        prompt = render(kind, task, ex, wrong)
        repeat = repeats[i] if repeats else 0
        params = {**backend.params(), "repeat": repeat} if repeat else backend.params()
        key = request_key(backend.name, backend.model, prompt, params)
        if key not in seen:  # the same question twice in a split is asked once
            seen.add(key)
            requests.append(Request(key, kind, ex, prompt, wrong))
    return requests


# ---------------------------------------------------------------- entry point

def random_draw(examples: list[Example], n: int | None, seed: int, per_question: int = 1) -> list[tuple[Example, int]]:
    """`n` requests drawn without replacement from `per_question` slots per question (all questions once when
    n is None), in split order: (question, how many times it was drawn before). `per_question` is feedback's
    cap on requests per question, so a control matched to a feedback round's request count can always be
    drawn from the same questions."""
    if n is None:
        return [(ex, 0) for ex in examples]
    slots = len(examples) * per_question
    if n > slots:
        raise UserError(f"--random_questions {n}: the split has only {len(examples)} questions "
                        f"(at most {per_question} request(s) each, --max_wrong_per_question)")
    drawn = sorted(random.Random(f"random_questions:{seed}").sample(range(slots), n), key=lambda s: (s % len(examples), s))
    return [(examples[s % len(examples)], s // len(examples)) for s in drawn]


def _jobs(args, examples: list[Example]) -> tuple[list[tuple[Example, str | None]], list[str], list[int] | None]:
    if args.mode == "annotate":
        per_question = args.max_wrong_per_question if args.random_questions else 1
        drawn = random_draw(examples, args.random_questions, args.seed, per_question)
        return [(ex, None) for ex, _ in drawn], [], [repeat for _, repeat in drawn]
    jobs, unknown = load_student_wrong(args.student_wrong, examples, args.skip_unknown_questions,
                                       args.max_wrong_per_question)
    return jobs, unknown, None


def _check_offline(task: TaskSpec, examples: list[Example]) -> None:
    missing = sum(1 for ex in examples if not ex.rationale)
    if missing:
        raise UserError(f"--backend offline needs a gold rationale for every question, but {missing} of "
                        f"{len(examples)} {task.name} questions have none; use --backend openai")


@dataclass
class Plan:
    """Everything validated and built before the first byte is written."""
    task: TaskSpec
    out: Path
    examples: list[Example]
    requests: list[Request]
    unknown: list[str]
    backend: Backend
    prices: Prices
    base_url: str | None
    api_key: str | None


def plan_collection(args) -> Plan:
    """All checks of user input happen here, so bad input never leaves files behind."""
    task = tasks.get_task(args.task)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir: {out} exists and is not a folder")
    base_url = (args.base_url or os.environ.get("OPENAI_BASE_URL") or None) if args.backend == "openai" else None
    if base_url and not args.base_url:
        check_base_url(base_url, "OPENAI_BASE_URL")
    examples = tasks.load_split(task.name, args.test_on, args.data_dir, limit=args.limit, valid_size=args.valid_size)
    if args.backend == "offline":
        _check_offline(task, examples)
    jobs, unknown, repeats = _jobs(args, examples)
    model = OFFLINE_MODEL if args.backend == "offline" else args.teacher_model
    prices = resolve_prices(model, load_price_table(args.price_table), args.prompt_price_per_1m,
                            args.completion_price_per_1m)
    if args.max_cost is not None and not prices.known:
        raise UserError(f"--max_cost: no price known for model {model!r}; pass --price_table or "
                        f"--prompt_price_per_1m and --completion_price_per_1m")
    api_key = api_key_for(base_url) if args.backend == "openai" and not args.dry_run else None
    backend = make_backend(args, task, base_url, api_key)
    return Plan(task, out, examples, build_requests(task, backend, jobs, args.mode, repeats), unknown, backend, prices,
                base_url, api_key)


def run_collection(args) -> dict:
    """Collect teacher rationales as `args` (a TeacherArguments) says; returns the summary dict.

    Writes <output_dir>/{journal.jsonl, teacher_data.json, teacher_provenance.jsonl, summary.json}
    (nothing on --dry_run: it prints the estimate). Raises UserError on bad input before writing anything,
    and CollectionFailed after writing what was collected when requests finally failed or the teacher
    could not be reached (nothing is written when no reply came at all)."""
    started = time.time()
    plan = plan_collection(args)
    journal = Journal(plan.out / "journal.jsonl")
    collector = Collector(plan.backend, journal, Budget(args.max_requests, args.max_cost), plan.prices,
                          RetryPolicy(args.max_retries, args.backoff_base), args.concurrency,
                          args.est_completion_tokens, secret=plan.api_key,
                          health=Health(args.max_consecutive_failures or None))
    summary = {"mode": args.mode, "task": plan.task.name, "split": args.test_on, "backend": plan.backend.name,
               "model": plan.backend.model, "base_url": public_url(plan.base_url),
               "template_hash": template_hash(args.mode, plan.task.kind), "params": plan.backend.params(),
               "questions": len(plan.examples),
               "questions_asked": len({r.example.question for r in plan.requests}),
               "unknown_questions_skipped": len(plan.unknown),
               "args": redact({**asdict(args), "base_url": public_url(args.base_url)})}
    if args.dry_run:
        records = journal.load(repair=False)
        pending = [r for r in plan.requests if r.key not in records]
        summary["dry_run"] = dry_run_estimate(collector, pending, args.num_samples, plan.prices)
        summary["requests"] = {"total": len(plan.requests), "from_journal": len(plan.requests) - len(pending)}
        print_dry_run(summary)
        return summary

    created_dir = not plan.out.exists()
    journal.lock()  # before load: the tail repair must not race another writer
    try:
        records = journal.load()
        pending = [r for r in plan.requests if r.key not in records]
        if not plan.prices.known:
            collector.log(f"no price known for model {plan.backend.model!r}: costs are recorded as 0")
        asyncio.run(_collect(collector, pending, records, args.num_samples))
    finally:
        journal.close()
    outputs = build_outputs(plan.task, plan.requests, records, collector.failures, plan.backend)
    summary.update(_summary_numbers(plan.requests, pending, records, collector, outputs, started))
    summary["failure"] = failure_message(summary, collector)
    if summary["failure"] and not any(r.key in records for r in plan.requests):
        if created_dir and not any(plan.out.iterdir()):
            plan.out.rmdir()  # a bad key, model or URL leaves no trace
        if collector.fatal:
            raise UserError(f"teacher rejected the first requests: {collector.fatal}")
        raise CollectionFailed(summary["failure"], summary)
    summary["outputs"] = {name: str(plan.out / name) for name in OUTPUT_FILES}
    _write_outputs(plan.out, outputs, summary)
    print_summary(summary, plan.out)
    if summary["failure"]:
        raise CollectionFailed(summary["failure"], summary)
    return summary


class CollectionFailed(Exception):
    """Requests finally failed: the outputs hold what was collected, and the run must not pass for
    complete (query_teacher.py exits 1, the round driver stops)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def failure_message(summary: dict, collector: Collector) -> str | None:
    """One line for a run that did not get every answer it went for; None if it did. Requests left
    by a budget stop are not failures: the user asked for that stop."""
    req = summary["requests"]
    failed = req["failed"] + (req["not_run"] if collector.stop_reason else 0)
    if not failed:
        return None
    reason = collector.stop_reason or Counter(collector.failures.values()).most_common(1)[0][0]
    if len(reason) > 300:
        reason = reason[:300] + "..."
    got = req["from_journal"] + req["new"]
    return (f"{failed} of {req['total']} requests failed ({reason}); re-run the same command to retry them "
            + (f"(the {got} replies so far are journaled)" if got else "(no reply was collected)"))


async def _collect(collector: Collector, pending: list[Request], records: dict, n: int) -> None:
    from tqdm import tqdm
    try:
        with tqdm(total=len(pending), desc="teacher", unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
            await collector.run(pending, records, n, bar)
    finally:
        # Closed inside the loop: left to the garbage collector, the HTTP client schedules its close on a loop
        # asyncio.run has already closed, and prints "Event loop is closed" after the run's one error line.
        close = getattr(collector.backend, "close", None)
        if close is not None:
            await close()


def _summary_numbers(requests, pending, records, collector: Collector, outputs: Outputs, started: float) -> dict:
    ours = [records[r.key] for r in requests if r.key in records]
    tokens = {k: sum(rec["usage"][k] for rec in ours) for k in ("prompt_tokens", "completion_tokens")}
    not_run = sum(1 for r in pending if r.key not in records and r.key not in collector.failures)
    elapsed = time.time() - started
    return {
        "requests": {"total": len(requests), "from_journal": len(requests) - len(pending),
                     "new": collector.new_records, "failed": len(collector.failures), "not_run": not_run},
        "samples": outputs.counts,
        "tokens": tokens,
        "cost_usd": {"this_run": round(collector.budget.spent, 6),
                     "all_requests": round(sum(rec.get("cost_usd", 0.0) for rec in ours), 6),
                     "prices_known": collector.prices.known},
        "stopped_early": bool(collector.budget.stop_reason or collector.stop_reason),
        "stop_reason": collector.stop_reason or collector.budget.stop_reason,
        "elapsed_s": round(elapsed, 3),
        "new_requests_per_s": round(collector.new_records / elapsed, 3) if elapsed > 0 else None,
    }


def _write_outputs(out: Path, outputs: Outputs, summary: dict) -> None:
    atomic_write_json(out / "teacher_data.json", outputs.teacher_data)
    atomic_write_jsonl(out / "teacher_provenance.jsonl", outputs.provenance)
    atomic_write_json(out / "summary.json", redact(summary))


def dry_run_estimate(collector: Collector, pending: list[Request], n: int, prices: Prices) -> dict:
    prompt_tokens = sum(estimate_tokens(prompt_text(r.prompt)) for r in pending)
    completion_tokens = collector.est_completion_tokens * n * len(pending)
    return {"new_requests": len(pending), "est_prompt_tokens": prompt_tokens,
            "est_completion_tokens": completion_tokens,
            "est_cost_usd": round(prices.cost(prompt_tokens, completion_tokens), 6), "prices_known": prices.known}


def print_dry_run(summary: dict) -> None:
    est = summary["dry_run"]
    cost = f"${est['est_cost_usd']:.4f}" if est["prices_known"] else "unknown (no price for this model)"
    print(f"dry run ({summary['backend']}/{summary['model']}, {summary['mode']} {summary['task']}/{summary['split']}): "
          f"{est['new_requests']} requests to make ({summary['requests']['from_journal']} already in the journal), "
          f"~{est['est_prompt_tokens']:,} prompt + ~{est['est_completion_tokens']:,} completion tokens, "
          f"estimated cost {cost}; no request was made")


def print_summary(summary: dict, out: Path) -> None:
    req, samples = summary["requests"], summary["samples"]
    reasons = ", ".join(f"{k} {v}" for k, v in samples["rejected_by_reason"].items())
    print(f"teacher {summary['mode']} {summary['task']}/{summary['split']} "
          f"({summary['backend']}/{summary['model']}, template {summary['template_hash']}):")
    print(f"  requests: {req['total']} total, {req['from_journal']} from journal, {req['new']} new, "
          f"{req['failed']} failed, {req['not_run']} not run")
    print(f"  rationales: {samples['kept']} kept, {samples['rejected']} rejected"
          + (f" ({reasons})" if reasons else ""))
    print(f"  questions with teacher data: {samples['questions_with_data']}/{summary['questions_asked']} asked "
          f"({summary['questions']} in the split)"
          + (f"; {summary['unknown_questions_skipped']} unknown questions skipped"
             if summary["unknown_questions_skipped"] else ""))
    cost = summary["cost_usd"]
    print(f"  tokens: {summary['tokens']['prompt_tokens']:,} prompt, {summary['tokens']['completion_tokens']:,} "
          f"completion; cost ${cost['this_run']:.4f} this run, ${cost['all_requests']:.4f} for all requests"
          + ("" if cost["prices_known"] else " (prices unknown)"))
    print(f"  wrote {out}/teacher_data.json, teacher_provenance.jsonl, summary.json, journal.jsonl "
          f"in {summary['elapsed_s']:.1f}s")
    if summary["stopped_early"]:
        print(f"STOPPED EARLY: {summary['stop_reason']}; {req['not_run']} requests not run. The outputs hold "
              f"what was collected; re-run the same command to continue.", file=sys.stderr)
