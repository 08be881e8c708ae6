"""The teacher: asks an LLM (or an offline stand-in) for rationales, keeps the correct ones.

Two request kinds (see teacher_templates.py): `annotate` a train question, or give tailored
`feedback` on one of the student's wrong rationales. Every completed request is appended to
a journal before anything uses it, so a re-run asks nothing twice and a killed run loses only
the requests in flight. The outputs (teacher data in the SPEC §4 seed format, provenance,
summary) are always rebuilt from the journal, so they do not depend on what was interrupted.

Round drivers call `run_collection(TeacherArguments(...))`; `query_teacher.py` is the CLI.
"""
from __future__ import annotations

import ast
import asyncio
import fcntl
import hashlib
import json
import operator
import os
import random
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import tasks
from common import UserError, atomic_write_json, atomic_write_jsonl, read_json, redact
from tasks import Example, TaskSpec
from teacher_templates import Prompt, gold_text, render, template_hash

OFFLINE_MODEL = "offline-v1"  # bump when the offline teacher's output changes: it is part of every key
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
CHARS_PER_TOKEN = 4           # rough token estimate for dry runs and the offline backend
MAX_BACKOFF_S = 60.0
OUTPUT_FILES = ("teacher_data.json", "teacher_provenance.jsonl", "summary.json", "journal.jsonl")


# ---------------------------------------------------------------- requests

@dataclass
class Request:
    key: str
    kind: str                  # "annotate" | "feedback"
    example: Example
    prompt: Prompt
    wrong: str | None = None   # the student's wrong rationale (feedback only)


@dataclass
class Reply:
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1


def request_key(backend: str, model: str, prompt: Prompt, params: dict) -> str:
    """Same backend, model, template, prompt and sampling parameters -> same key -> answered once."""
    blob = json.dumps({"backend": backend, "model": model, "template_hash": prompt.template_hash,
                       "messages": prompt.messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def prompt_text(prompt: Prompt) -> str:
    return "\n".join(m["content"] for m in prompt.messages)


# ---------------------------------------------------------------- prices

# USD per 1M tokens (prompt, completion), list prices when written; override with --price_table.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    OFFLINE_MODEL: (0.0, 0.0),
}


@dataclass(frozen=True)
class Prices:
    prompt_per_1m: float
    completion_per_1m: float
    known: bool = True

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1m + completion_tokens * self.completion_per_1m) / 1e6


def load_price_table(path: str | None) -> dict[str, tuple[float, float]]:
    table = dict(DEFAULT_PRICES)
    if not path:
        return table
    data = read_json(path, "--price_table file")
    if not isinstance(data, dict):
        raise UserError(f"--price_table: {path}: expected {{model: {{prompt_per_1m, completion_per_1m}}}}")
    for model, entry in data.items():
        try:
            table[model] = (float(entry["prompt_per_1m"]), float(entry["completion_per_1m"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--price_table: {path}: model {model!r} needs numeric prompt_per_1m and "
                            f"completion_per_1m") from None
    return table


def resolve_prices(model: str, table: dict[str, tuple[float, float]],
                   prompt_override: float | None, completion_override: float | None) -> Prices:
    """Exact model name, else the longest known prefix ('gpt-4o-mini-2024-07-18' -> 'gpt-4o-mini')."""
    match = model if model in table else max((m for m in table if model.startswith(m)), key=len, default=None)
    base = table.get(match) if match else None
    if base is None and (prompt_override is None or completion_override is None):
        return Prices(prompt_override or 0.0, completion_override or 0.0, known=False)
    prompt, completion = base or (0.0, 0.0)
    return Prices(prompt if prompt_override is None else prompt_override,
                  completion if completion_override is None else completion_override)


# ---------------------------------------------------------------- journal

class Journal:
    """Append-only JSONL of completed requests: one line per request, one write call, fsynced.

    A run killed mid-write can leave half a line at the end; `load` cuts it off so the next
    append starts on a clean line. One writer per file, enforced by a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._write_lock = threading.Lock()

    def lock(self) -> None:
        """Lock the folder itself (flock works on directory fds): no lock file is left behind."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UserError(f"{self.path.parent}: another teacher collection is writing there") from None

    def load(self, repair: bool = True) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if repair and len(complete) < len(data):
            with open(self.path, "r+b") as f:  # drop the half-written tail of a killed run
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())
        records: dict[str, dict] = {}
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cannot happen with single-write appends; tolerated rather than fatal
            if isinstance(record, dict) and "key" in record:
                records.setdefault(record["key"], record)
        return records

    def append(self, record: dict) -> None:
        """Thread-safe: the collector appends from worker threads so fsync does not stall the event loop."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._write_lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, line)
        os.fsync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


# ---------------------------------------------------------------- backends

class RetryableError(Exception):
    """A transient failure: 429, 5xx, timeout, connection error, malformed reply."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure every further request would hit too (bad key, unknown model): stop the run."""


class RequestError(Exception):
    """This request cannot be answered (e.g. 400); the others may still work."""


class Backend(Protocol):
    name: str
    model: str

    def params(self) -> dict: ...

    async def complete(self, request: Request) -> Reply: ...


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` / `retry-after` (a number; HTTP dates are not worth parsing)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


class OpenAITeacher:
    name = "openai"

    def __init__(self, model: str, base_url: str | None, api_key: str, timeout: float,
                 n: int, temperature: float, max_tokens: int):
        import openai  # only this backend needs the client

        self._openai = openai
        self.model = model
        self._n, self._temperature, self._max_tokens = n, temperature, max_tokens
        # max_retries=0: our own loop retries, so the policy is visible, logged and testable.
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    def params(self) -> dict:
        return {"n": self._n, "temperature": self._temperature, "max_tokens": self._max_tokens}

    async def complete(self, request: Request) -> Reply:
        openai = self._openai
        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=request.prompt.messages, **self.params())
        except openai.APIStatusError as err:
            self._raise_for_status(err)
        except (openai.APIConnectionError, openai.APIResponseValidationError) as err:  # incl. timeouts
            raise RetryableError(f"{type(err).__name__}: {err}") from None
        except ValueError as err:  # a 200 whose body is not JSON (json.JSONDecodeError)
            raise RetryableError(f"malformed reply ({type(err).__name__})") from None
        return self._reply(response)

    def _raise_for_status(self, err) -> None:
        status = err.status_code
        message = f"HTTP {status}: {str(err)[:200]}"
        if status in (408, 409, 429) or status >= 500:
            raise RetryableError(message, _retry_after(err.response.headers)) from None
        if status in (401, 403, 404):
            raise FatalError(message) from None
        raise RequestError(message) from None

    @staticmethod
    def _reply(response) -> Reply:
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise RetryableError("malformed reply (no choices)")
        texts = [(getattr(c.message, "content", None) or "") if getattr(c, "message", None) else ""
                 for c in choices]
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        return Reply(texts, prompt_tokens, completion_tokens)


# ---- offline teacher: correct rationales from the dataset's gold solution

_NUM = r"\$?\d+(?:\.\d+)?"
_OP = r"[-+*/x×÷]"
_EQUATION = re.compile(rf"(?<![\w.])({_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*=\s*(-?{_NUM})")
_EVAL_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Equation:
    lhs: str        # "7 + 5", as the student wrote the operands and operators
    claimed: float  # what the text says the lhs equals
    first: str      # first operand, for "should start from"

    @property
    def value(self) -> float | None:
        return _evaluate(self.lhs)

    def __str__(self) -> str:
        return f"{self.lhs} = {_fmt(self.claimed)}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4f}".rstrip("0").rstrip(".")


def _evaluate(lhs: str) -> float | None:
    expr = lhs.replace("$", "").replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        return _eval_node(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, KeyError, TypeError):
        return None


def _eval_node(node) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp):
        return _EVAL_OPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    raise TypeError("not arithmetic")


def parse_equations(text: str) -> list[Equation]:
    """Every `a op b [op c ...] = r` in the text, in order (commas in numbers ignored)."""
    found = []
    for match in _EQUATION.finditer(re.sub(r"(?<=\d),(?=\d{3})", "", text)):
        tokens = re.findall(rf"{_NUM}|{_OP}", match.group(1))
        claimed = float(match.group(2).replace("$", ""))
        found.append(Equation(" ".join(tokens), claimed, tokens[0].replace("$", "")))
    return found


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def diagnose(wrong: str, gold_rationale: str, task: TaskSpec, gold: str) -> str:
    """One sentence naming the student's first wrong step (by arithmetic, then against the gold steps)."""
    student, reference = parse_equations(wrong), parse_equations(gold_rationale)
    for i, step in enumerate(student):
        if not _close(step.claimed, step.value) and step.value is not None:
            return f"The step {step} is wrong: {step.lhs} = {_fmt(step.value)}."
        if i < len(reference) and not _close(step.claimed, reference[i].claimed):
            right = reference[i]
            if step.first != right.first:
                return f"The step {step} should start from {right.first}: {right}."
            return f"The step {step} is wrong: it should be {right}."
    predicted = tasks.extract_answer(task, wrong)
    shown = f" {predicted}" if predicted is not None else ""
    if len(student) > len(reference) > 0:
        return f"The step {student[len(reference)]} is not needed: the answer is reached after {reference[-1]}."
    if student:
        return f"The steps shown are right, but they stop too early, so the final answer{shown} is wrong."
    return f"The final answer{shown} is wrong; the correct answer is {gold}."


OPENERS = {
    "annotate": ["", "Let's think step by step."],
    "feedback": ["Here is the correct reasoning.", "Let's redo it correctly.", "The correct solution goes like this.",
                 "Starting again from the beginning.", "Let's fix it step by step."],
}
CONNECTORS = [", so ", ", which gives ", "; hence ", ", and so "]


_CONNECTOR = re.compile("|".join(re.escape(c) for c in CONNECTORS))
_THEREFORE = re.compile(r"\s*Therefore, the answer is [^.]*\.?\s*$")


def _rephrase(body: str, connector: str, rng: random.Random) -> str:
    """The gold steps in another wording: the first step keeps `connector`, later ones are re-drawn,
    and the gold's own closing sentence gives way to ours."""
    body = _THEREFORE.sub("", body)
    for opener in OPENERS["annotate"]:
        if opener and body.startswith(opener):
            body = body[len(opener):].lstrip()
    picks = iter([connector] + [rng.choice(CONNECTORS) for _ in range(len(_CONNECTOR.findall(body)))])
    return _CONNECTOR.sub(lambda _: next(picks), body)


def _variants(kind: str) -> list[tuple[str, str]]:
    return [(opener, conn) for conn in CONNECTORS for opener in OPENERS[kind]]


def _wrong_answer(task: TaskSpec, gold: str, rng: random.Random) -> str:
    if task.kind == "yesno":
        return "no" if gold.lower() == "yes" else "yes"
    try:
        return _fmt(float(gold) + rng.choice([-2, -1, 1, 2, 10]))
    except ValueError:
        return gold + "0"


class OfflineTeacher:
    """Deterministic teacher for datasets with gold rationales (wordmath, gsm_symbolic).

    n distinct phrasings per request (the triplet loss needs a second teacher rationale as
    positive); an optional small error rate writes a wrong final answer so the filter has work."""

    name = "offline"
    model = OFFLINE_MODEL

    def __init__(self, task: TaskSpec, n: int, error_rate: float, seed: int):
        self.task, self._n, self._error_rate, self._seed = task, n, error_rate, seed

    def params(self) -> dict:
        return {"n": self._n, "error_rate": self._error_rate, "seed": self._seed}

    async def complete(self, request: Request) -> Reply:
        return self.answer(request)

    def answer(self, request: Request) -> Reply:
        rng = random.Random(request.key)  # the key already holds seed and params
        ex = request.example
        pool = _variants(request.kind)
        picks = rng.sample(range(len(pool)), min(self._n, len(pool)))
        picks += [rng.randrange(len(pool)) for _ in range(self._n - len(picks))]
        prefix = ""
        if request.kind == "feedback":
            prefix = diagnose(request.wrong or "", ex.rationale or "", self.task, ex.gold)
        texts = []
        for i in picks:
            opener, connector = pool[i]
            body = _rephrase(tasks.fold(ex.rationale or ""), connector, rng)
            answer = gold_text(self.task, ex)
            if rng.random() < self._error_rate:
                answer = _wrong_answer(self.task, ex.gold, rng)
            texts.append(" ".join(p for p in [prefix, opener, body, f"Therefore, the answer is {answer}."] if p))
        completion = sum(estimate_tokens(t) for t in texts)
        return Reply(texts, estimate_tokens(prompt_text(request.prompt)), completion)


# ---------------------------------------------------------------- retries

@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_delay: float = 1.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:  # the server knows best; a little jitter avoids a thundering herd
            return min(MAX_BACKOFF_S, retry_after) * rng.uniform(1.0, 1.2)
        return min(MAX_BACKOFF_S, self.base_delay * 2 ** attempt) * rng.uniform(0.5, 1.0)


async def complete_with_retries(backend: Backend, request: Request, policy: RetryPolicy,
                                rng: random.Random, log) -> Reply:
    """RetryableError -> back off and try again; after max_retries it becomes a RequestError."""
    for attempt in range(policy.max_retries + 1):
        try:
            reply = await backend.complete(request)
            reply.attempts = attempt + 1
            return reply
        except RetryableError as err:
            if attempt == policy.max_retries:
                raise RequestError(f"gave up after {attempt + 1} attempts: {err}") from None
            wait = policy.delay(attempt, err.retry_after, rng)
            log(f"retry {attempt + 1}/{policy.max_retries} in {wait:.2f}s ({err})")
            await asyncio.sleep(wait)
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
    failures: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None
    new_records: int = 0

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
            if self.fatal or not self.budget.admit(estimate):
                semaphore.release()
                break
            rng = random.Random(seed_rng.random())  # per-request jitter stream
            running.append(asyncio.create_task(self._one(request, estimate, records, semaphore, rng, bar)))
        await asyncio.gather(*running)

    async def _one(self, request: Request, estimate: float, records: dict, semaphore, rng, bar) -> None:
        actual = 0.0
        try:
            reply = await complete_with_retries(self.backend, request, self.policy, rng, self.log)
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
        finally:
            self.budget.settle(estimate, actual)
            semaphore.release()
            bar.update(1)

    def _record(self, request: Request, reply: Reply, cost: float) -> dict:
        return {"key": request.key, "kind": request.kind, "question": request.example.question,
                "gold": request.example.gold, "wrong": request.wrong, "backend": self.backend.name,
                "model": self.backend.model, "template_hash": request.prompt.template_hash,
                "params": self.backend.params(), "texts": reply.texts,
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
                "cost_usd": round(cost, 8), "attempts": reply.attempts, "finished_at": round(time.time(), 3)}


# ---------------------------------------------------------------- judging teacher replies

_FINAL = re.compile(r"Therefore, the answer is .*?(?:\.(?=\s|$)|$)")


def judge(task: TaskSpec, text: str, gold: str) -> tuple[str | None, str]:
    """(one-paragraph rationale cut after its final sentence, reason); reason 'kept' or why not."""
    if not text or not text.strip():
        return None, "empty"
    paragraph = tasks.fold(text)
    final = _FINAL.search(paragraph)
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
            rationale, reason = judge(task, text, request.example.gold)
            kept_list = data.setdefault(request.example.question, [])
            if reason == "kept" and rationale in kept_list:
                reason = "duplicate"
            if reason == "kept":
                kept_list.append(rationale)
            else:
                reasons[reason] = reasons.get(reason, 0) + 1
            provenance.append({**base, "rationale": rationale, "kept": reason == "kept", "reason": reason})
    data = {q: r for q, r in data.items() if r}
    kept = sum(len(r) for r in data.values())
    counts = {"kept": kept, "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
              "questions_with_data": len(data)}
    return Outputs(data, provenance, counts)


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

def scrub_strings(obj):
    """common.redact on every string; numbers stay (redact hides any value under a key like
    'max_tokens', and the summary's token counts are no secret)."""
    if isinstance(obj, dict):
        return {k: scrub_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_strings(v) for v in obj]
    return redact(obj) if isinstance(obj, str) else obj


def _is_local(base_url: str | None) -> bool:
    return bool(base_url) and (urlparse(base_url).hostname or "") in LOCAL_HOSTS


def _public_url(base_url: str | None) -> str | None:
    """base_url without any user:password part, for files and logs."""
    if not base_url:
        return None
    parsed = urlparse(base_url)
    return redact(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl())


def api_key_for(base_url: str | None) -> str:
    """OPENAI_API_KEY only (never a flag); a local server may do without one."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if _is_local(base_url):
        return "local-server-no-key"
    raise UserError("OPENAI_API_KEY is not set: export it to use --backend openai "
                    "(the key is read from the environment only and never written anywhere)")


def make_backend(args, task: TaskSpec, base_url: str | None, api_key: str | None) -> Backend:
    if args.backend == "offline":
        return OfflineTeacher(task, args.num_samples, args.offline_error_rate, args.seed)
    return OpenAITeacher(args.teacher_model, base_url, api_key or "dry-run-no-key", args.request_timeout,
                         args.num_samples, args.temperature, args.max_tokens)


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
               "model": plan.backend.model, "base_url": _public_url(plan.base_url),
               "template_hash": template_hash(args.mode), "params": plan.backend.params(),
               "questions": len(plan.examples),
               "questions_asked": len({r.example.question for r in plan.requests}),
               "unknown_questions_skipped": len(plan.unknown),
               "args": scrub_strings({**asdict(args), "base_url": _public_url(args.base_url)})}
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
    atomic_write_json(out / "summary.json", scrub_strings(summary))


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

