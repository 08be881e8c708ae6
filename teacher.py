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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tasks
from common import UserError, atomic_write_json, atomic_write_jsonl, read_json, redact
from tasks import Example, TaskSpec
from teacher_backends import Backend, api_key_for, make_backend, public_url
from teacher_collect import Budget, Collector, Outputs, RetryPolicy, build_outputs
from teacher_journal import (OFFLINE_MODEL, Journal, Prices, Request, estimate_tokens, load_price_table, prompt_text,
                             request_key, resolve_prices)
from teacher_templates import render, template_hash

OUTPUT_FILES = ("teacher_data.json", "teacher_provenance.jsonl", "summary.json", "journal.jsonl")


# ---------------------------------------------------------------- building requests

def load_student_wrong(path: str | None, examples: list[Example], skip_unknown: bool,
                       per_question: int) -> tuple[list[tuple[Example, str]], list[str]]:
    """(example, wrong rationale) pairs in dataset order, and the questions not in the split."""
    if not path:
        raise UserError("--mode feedback needs --student_wrong path/to/student_wrong.json")
    data = read_json(path, "--student_wrong file")
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(r, str) for r in v) for v in data.values()):
        raise UserError(f"--student_wrong: {path}: expected {{question: [wrong rationale, ...]}}")
    by_text = {tasks.fold(ex.question): ex for ex in examples}
    unknown = [q for q in data if tasks.fold(q) not in by_text]
    if unknown and not skip_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"--student_wrong: {path}: question not in the split: {unknown[0][:120]!r}{more}; "
                        f"pass --skip_unknown_questions to skip such questions")
    wanted = {tasks.fold(q): rationales for q, rationales in data.items()}
    pairs = []
    for ex in examples:
        unique = list(dict.fromkeys(tasks.fold(r) for r in wanted.get(tasks.fold(ex.question), []) if r.strip()))
        pairs += [(ex, wrong) for wrong in unique[:per_question]]
    return pairs, unknown


def build_requests(task: TaskSpec, backend: Backend, jobs: list[tuple[Example, str | None]],
                   kind: str) -> list[Request]:
    requests, seen = [], set()
    for ex, wrong in jobs:
        prompt = render(kind, task, ex, wrong)
        key = request_key(backend.name, backend.model, prompt, backend.params())
        if key not in seen:  # the same question twice in a split is asked once
            seen.add(key)
            requests.append(Request(key, kind, ex, prompt, wrong))
    return requests


# ---------------------------------------------------------------- entry point

def _jobs(args, examples: list[Example]) -> tuple[list[tuple[Example, str | None]], list[str]]:
    if args.mode == "annotate":
        return [(ex, None) for ex in examples], []
    return load_student_wrong(args.student_wrong, examples, args.skip_unknown_questions,
                              args.max_wrong_per_question)


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
    examples = tasks.load_split(task.name, args.test_on, args.data_dir, limit=args.limit, valid_size=args.valid_size)
    if args.backend == "offline":
        _check_offline(task, examples)
    jobs, unknown = _jobs(args, examples)
    model = OFFLINE_MODEL if args.backend == "offline" else args.teacher_model
    prices = resolve_prices(model, load_price_table(args.price_table), args.prompt_price_per_1m,
                            args.completion_price_per_1m)
    if args.max_cost is not None and not prices.known:
        raise UserError(f"--max_cost: no price known for model {model!r}; pass --price_table or "
                        f"--prompt_price_per_1m and --completion_price_per_1m")
    api_key = api_key_for(base_url) if args.backend == "openai" and not args.dry_run else None
    backend = make_backend(args, task, base_url, api_key)
    return Plan(task, out, examples, build_requests(task, backend, jobs, args.mode), unknown, backend, prices,
                base_url, api_key)


def run_collection(args) -> dict:
    """Collect teacher rationales as `args` (a TeacherArguments) says; returns the summary dict.

    Writes <output_dir>/{journal.jsonl, teacher_data.json, teacher_provenance.jsonl, summary.json}
    (nothing on --dry_run: it prints the estimate). Raises UserError on bad input before writing anything."""
    started = time.time()
    plan = plan_collection(args)
    journal = Journal(plan.out / "journal.jsonl")
    collector = Collector(plan.backend, journal, Budget(args.max_requests, args.max_cost), plan.prices,
                          RetryPolicy(args.max_retries, args.backoff_base), args.concurrency,
                          args.est_completion_tokens, secret=plan.api_key)
    summary = {"mode": args.mode, "task": plan.task.name, "split": args.test_on, "backend": plan.backend.name,
               "model": plan.backend.model, "base_url": public_url(plan.base_url),
               "template_hash": template_hash(args.mode), "params": plan.backend.params(),
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
    if collector.fatal and not any(r.key in records for r in plan.requests):
        if created_dir and not any(plan.out.iterdir()):
            plan.out.rmdir()  # a bad key or model leaves no trace
        raise UserError(f"teacher rejected the first requests: {collector.fatal}")
    outputs = build_outputs(plan.task, plan.requests, records, collector.failures, plan.backend)
    summary.update(_summary_numbers(plan.requests, pending, records, collector, outputs, started))
    summary["outputs"] = {name: str(plan.out / name) for name in OUTPUT_FILES}
    _write_outputs(plan.out, outputs, summary)
    print_summary(summary, plan.out)
    if collector.fatal:
        raise UserError(f"teacher stopped the run: {collector.fatal} (outputs hold what was collected)")
    return summary


def read_summary(out: Path) -> dict | None:
    """What a finished collection in `out` kept (None if it has not finished): the round driver reads this."""
    if not (out / "summary.json").is_file() or not (out / "teacher_data.json").is_file():
        return None
    summary = read_json(out / "summary.json")
    return {"teacher_data": str(out / "teacher_data.json"), "template_hash": summary.get("template_hash"),
            "model": summary.get("model"), "kept": summary["samples"]["kept"],
            "rejected": summary["samples"]["rejected"], "cost_usd": summary["cost_usd"]["all_requests"]}


async def _collect(collector: Collector, pending: list[Request], records: dict, n: int) -> None:
    from tqdm import tqdm
    with tqdm(total=len(pending), desc="teacher", unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
        await collector.run(pending, records, n, bar)


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
        "stopped_early": bool(collector.budget.stop_reason or collector.fatal),
        "stop_reason": collector.budget.stop_reason or collector.fatal,
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
