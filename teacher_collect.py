"""Collecting teacher replies: retries with back-off, the spending budget, the concurrent
collector that journals every reply before use, and the judge that keeps correct rationales.
"""
from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field

import tasks
from answers import FINAL_SENTENCE
from common import redact
from tasks import TaskSpec
from teacher_backends import Backend, FatalError, RequestError, RetryableError
from teacher_journal import Journal, Prices, Reply, Request, estimate_tokens, prompt_text
from teacher_templates import split_feedback

MAX_BACKOFF_S = 60.0


# ---------------------------------------------------------------- retries

@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_delay: float = 1.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:  # the server knows best; a little jitter avoids a thundering herd
            return min(MAX_BACKOFF_S, retry_after) * rng.uniform(1.0, 1.2)
        return min(MAX_BACKOFF_S, self.base_delay * 2 ** attempt) * rng.uniform(0.5, 1.0)


class TeacherUnreachable(Exception):
    """Connection failures in a row with no answer between: every further request would fail too."""


@dataclass
class Health:
    """Failed connection attempts in a row, over all requests; any answer from the server (an error
    status included) resets the count. `limit` None: never give up on the server."""
    limit: int | None = None
    streak: int = 0

    def answered(self) -> None:
        self.streak = 0

    def failed(self, err: RetryableError) -> None:
        if not err.connection:
            self.streak = 0  # a 429, 5xx or malformed body still came from the server
            return
        self.streak += 1
        if self.limit is not None and self.streak >= self.limit:
            raise TeacherUnreachable(f"teacher unreachable: {self.streak} connection failures in a row with no "
                                     f"answer between (last: {err}); see --max_consecutive_failures, --request_timeout")


async def complete_with_retries(backend: Backend, request: Request, policy: RetryPolicy,
                                rng: random.Random, log, health: Health | None = None) -> Reply:
    """RetryableError -> back off and try again; after max_retries it becomes a RequestError.
    TeacherUnreachable when `health` says the server is down."""
    health = health if health is not None else Health()
    for attempt in range(policy.max_retries + 1):
        try:
            reply = await backend.complete(request)
        except RetryableError as err:
            health.failed(err)
            if attempt == policy.max_retries:
                raise RequestError(f"gave up after {attempt + 1} attempts: {err}") from None
            wait = policy.delay(attempt, err.retry_after, rng)
            log(f"retry {attempt + 1}/{policy.max_retries} in {wait:.2f}s ({err})")
            await asyncio.sleep(wait)
            continue
        except (RequestError, FatalError):
            health.answered()
            raise
        health.answered()
        reply.attempts = attempt + 1
        return reply
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- budget

@dataclass
class Budget:
    """Stops launching requests before --max_requests / --max_cost would be passed."""
    max_requests: int | None
    max_cost: float | None
    launched: int = 0
    spent: float = 0.0
    reserved: float = 0.0
    stop_reason: str | None = None

    def admit(self, estimate: float) -> bool:
        if self.stop_reason:
            return False
        if self.max_requests is not None and self.launched >= self.max_requests:
            self.stop_reason = f"--max_requests {self.max_requests} reached"
        elif self.max_cost is not None and self.spent + self.reserved + estimate > self.max_cost:
            self.stop_reason = f"--max_cost ${self.max_cost:g} reached (spent ${self.spent:.4f})"
        else:
            self.launched += 1
            self.reserved += estimate
            return True
        return False

    def settle(self, estimate: float, actual: float) -> None:
        self.reserved -= estimate
        self.spent += actual


# ---------------------------------------------------------------- collection

@dataclass
class Collector:
    backend: Backend
    journal: Journal
    budget: Budget
    prices: Prices
    policy: RetryPolicy
    concurrency: int
    est_completion_tokens: int
    secret: str | None = None
    health: Health = field(default_factory=Health)
    failures: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None        # the server refuses every request (bad key, unknown model)
    unreachable: str | None = None  # the server cannot be reached at all
    new_records: int = 0
    _asking: set = field(default_factory=set, repr=False)

    @property
    def stop_reason(self) -> str | None:
        return self.fatal or self.unreachable

    def scrub(self, text: str) -> str:
        if self.secret:
            text = text.replace(self.secret, "<redacted>")
        return redact(text)

    def log(self, message: str) -> None:
        from tqdm import tqdm
        tqdm.write(f"teacher: {self.scrub(message)}", file=sys.stderr)

    def estimate_cost(self, request: Request, n: int) -> float:
        return self.prices.cost(estimate_tokens(prompt_text(request.prompt)), self.est_completion_tokens * n)

    async def run(self, pending: list[Request], records: dict[str, dict], n: int, bar) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)
        seed_rng = random.Random(0)
        running = []
        for request in pending:
            await semaphore.acquire()
            estimate = self.estimate_cost(request, n)
            if self.stop_reason or not self.budget.admit(estimate):
                semaphore.release()
                break
            rng = random.Random(seed_rng.random())  # per-request jitter stream
            running.append(asyncio.create_task(self._one(request, estimate, records, semaphore, rng, bar)))
        await asyncio.gather(*running)

    async def _one(self, request: Request, estimate: float, records: dict, semaphore, rng, bar) -> None:
        actual = 0.0
        task = asyncio.current_task()
        try:
            self._asking.add(task)
            try:
                reply = await complete_with_retries(self.backend, request, self.policy, rng, self.log, self.health)
            finally:
                self._asking.discard(task)
            actual = self.prices.cost(reply.prompt_tokens, reply.completion_tokens)
            record = self._record(request, reply, actual)
            await asyncio.to_thread(self.journal.append, record)  # durable before anything uses it
            records[request.key] = record
            self.new_records += 1
        except RequestError as err:
            self.failures[request.key] = self.scrub(str(err))
            self.log(f"request failed for {request.example.question[:60]!r}: {self.failures[request.key]}")
        except FatalError as err:
            self.fatal = self.scrub(str(err))
            self.failures[request.key] = self.fatal
            self._stop_asking()
        except TeacherUnreachable as err:
            self.unreachable = self.scrub(str(err))
            self.failures[request.key] = self.unreachable
            self.log(f"stopping: {self.unreachable}")
            self._stop_asking()
        except asyncio.CancelledError:
            if not self.stop_reason:
                raise
            # stopped by another request's verdict: counted "not run", asked again by the next run
        finally:
            self.budget.settle(estimate, actual)
            semaphore.release()
            bar.update(1)

    def _stop_asking(self) -> None:
        """Cancel the requests still waiting on the server or in back-off. Only those: one whose reply
        is being journaled finishes, so the journal and this run's outputs agree."""
        for other in self._asking:
            if other is not asyncio.current_task():
                other.cancel()

    def _record(self, request: Request, reply: Reply, cost: float) -> dict:
        return {"key": request.key, "kind": request.kind, "question": request.example.question,
                "gold": request.example.gold, "wrong": request.wrong, "backend": self.backend.name,
                "model": self.backend.model, "template_hash": request.prompt.template_hash,
                "params": self.backend.params(), "texts": reply.texts,
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
                "cost_usd": round(cost, 8), "attempts": reply.attempts, "finished_at": round(time.time(), 3)}


# ---------------------------------------------------------------- judging teacher replies

def judge(task: TaskSpec, text: str, gold: str, kind: str = "annotate") -> tuple[str | None, str]:
    """(one-paragraph rationale cut after its final sentence, reason); reason 'kept' or why not.
    A feedback reply is judged on its solution, after SOLUTION_MARKER; its critique is not training data."""
    if not text or not text.strip():
        return None, "empty"
    if kind == "feedback":
        text = split_feedback(text)[1]
        if not text:
            return None, "no_solution_marker"
    paragraph = tasks.fold(text)
    final = FINAL_SENTENCE.search(paragraph)
    if final is None:
        return paragraph, "no_final_sentence"
    rationale = paragraph[: final.end()]
    if not rationale.endswith("."):
        rationale += "."  # the student learns one shape of final sentence
    predicted = tasks.extract_answer(task, rationale)
    if predicted is None:
        return rationale, "no_answer"
    if not tasks.answers_match(task, predicted, gold):
        return rationale, "wrong_answer"
    return rationale, "kept"


@dataclass
class Outputs:
    teacher_data: dict[str, list[str]]
    provenance: list[dict]
    counts: dict


def build_outputs(task: TaskSpec, requests: list[Request], records: dict[str, dict],
                  failures: dict[str, str], backend: Backend) -> Outputs:
    """Teacher data in request order (dataset order), so it is the same however the run went."""
    data: dict[str, list[str]] = {}
    provenance, reasons = [], {}
    for request in requests:
        record = records.get(request.key)
        base = {"question": request.example.question, "kind": request.kind, "request_key": request.key,
                "template_hash": request.prompt.template_hash, "backend": backend.name, "model": backend.model}
        if request.wrong is not None:
            base["student_rationale"] = request.wrong
        if record is None:
            reason = "request_failed: " + failures[request.key] if request.key in failures else "not_run"
            provenance.append({**base, "rationale": None, "kept": False, "reason": reason})
            continue
        for text in record["texts"]:
            rationale, reason = judge(task, text, request.example.gold, request.kind)
            critique = {"critique": split_feedback(text)[0]} if request.kind == "feedback" else {}
            kept_list = data.setdefault(request.example.question, [])
            if reason == "kept" and rationale in kept_list:
                reason = "duplicate"
            if reason == "kept":
                kept_list.append(rationale)
            else:
                reasons[reason] = reasons.get(reason, 0) + 1
            provenance.append({**base, **critique, "rationale": rationale, "kept": reason == "kept", "reason": reason})
    data = {q: r for q, r in data.items() if r}
    kept = sum(len(r) for r in data.values())
    counts = {"kept": kept, "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
              "questions_with_data": len(data)}
    return Outputs(data, provenance, counts)
