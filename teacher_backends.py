"""Teacher backends behind one interface (`complete(request) -> Reply`): any OpenAI-compatible
server through the `openai` client, and an offline stand-in that rewrites the dataset's gold
solutions (for the embedded tasks, CI and laptops). Plus the key and URL handling of the former.
"""
from __future__ import annotations

import ast
import operator
import os
import random
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import tasks
from answers import CLOSING_FINAL_SENTENCE, final_sentence, format_number, numbers_close
from common import UserError, redact
from tasks import TaskSpec
from teacher_journal import OFFLINE_MODEL, Reply, Request, estimate_tokens, is_empty_reply, prompt_text
from teacher_templates import SOLUTION_MARKER, gold_text
from wordmath import CONNECTORS, STEP_BY_STEP

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


# ---------------------------------------------------------------- backends

class RetryableError(Exception):
    """A transient failure: 429, 5xx, timeout, connection error, malformed or empty reply.

    `connection`: the server was not reached (refused, DNS, timeout). A run of these with no
    answer in between means the teacher is down, and the collector stops instead of retrying
    every remaining request."""

    def __init__(self, message: str, retry_after: float | None = None, connection: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.connection = connection


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
        self.model = model
        self._n, self._temperature, self._max_tokens = n, temperature, max_tokens
        self._connection = {"api_key": api_key, "base_url": base_url, "timeout": timeout}
        self._client = None

    @property
    def client(self):
        """The OpenAI client, made on first use: importing openai takes ~1.5 s, which --dry_run never needs."""
        if self._client is None:
            import openai

            # max_retries=0: our own loop retries, so the policy is visible, logged and testable.
            self._client = openai.AsyncOpenAI(max_retries=0, **self._connection)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def params(self) -> dict:
        return {"n": self._n, "temperature": self._temperature, "max_tokens": self._max_tokens}

    async def complete(self, request: Request) -> Reply:
        import openai
        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=request.prompt.messages, **self.params())
        except openai.APIStatusError as err:
            self._raise_for_status(err)
        except openai.APIConnectionError as err:  # incl. APITimeoutError
            raise RetryableError(f"{type(err).__name__}: {err}", connection=True) from None
        except openai.APIResponseValidationError as err:
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
        if is_empty_reply(texts):  # a hiccup, not an answer: journaled it would be reused forever
            raise RetryableError("empty reply (no text in any choice)")
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
        return f"{self.lhs} = {format_number(self.claimed)}"


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


def diagnose(wrong: str, gold_rationale: str, task: TaskSpec, gold: str) -> str:
    """One sentence naming the student's first wrong step (by arithmetic, then against the gold steps)."""
    student, reference = parse_equations(wrong), parse_equations(gold_rationale)
    for i, step in enumerate(student):
        if not numbers_close(step.claimed, step.value) and step.value is not None:
            return f"The step {step} is wrong: {step.lhs} = {format_number(step.value)}."
        if i < len(reference) and not numbers_close(step.claimed, reference[i].claimed):
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


OPENERS = ["", STEP_BY_STEP]


_CONNECTOR = re.compile("|".join(re.escape(c) for c in CONNECTORS))


def _rephrase(body: str, connector: str, rng: random.Random) -> str:
    """The gold steps in another wording: the first step keeps `connector`, later ones are re-drawn,
    and the gold's own closing sentence gives way to ours."""
    body = CLOSING_FINAL_SENTENCE.sub("", body)
    for opener in OPENERS:
        if opener and body.startswith(opener):
            body = body[len(opener):].lstrip()
    picks = iter([connector] + [rng.choice(CONNECTORS) for _ in range(len(_CONNECTOR.findall(body)))])
    return _CONNECTOR.sub(lambda _: next(picks), body)


def _variants() -> list[tuple[str, str]]:
    return [(opener, conn) for conn in CONNECTORS for opener in OPENERS]


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
        pool = _variants()
        picks = rng.sample(range(len(pool)), min(self._n, len(pool)))
        picks += [rng.randrange(len(pool)) for _ in range(self._n - len(picks))]
        prefix = ""
        if request.kind == "feedback":  # the critique, then the solution (as FEEDBACK asks a real teacher)
            prefix = f"{diagnose(request.wrong or '', ex.rationale or '', self.task, ex.gold)} {SOLUTION_MARKER}"
        texts = []
        for i in picks:
            opener, connector = pool[i]
            body = _rephrase(tasks.fold(ex.rationale or ""), connector, rng)
            answer = gold_text(self.task, ex)
            if rng.random() < self._error_rate:
                answer = self.task.answers.wrong_answer(ex.gold, rng)
            texts.append(" ".join(p for p in [prefix, opener, body, final_sentence(answer)] if p))
        completion = sum(estimate_tokens(t) for t in texts)
        return Reply(texts, estimate_tokens(prompt_text(request.prompt)), completion)



# ---------------------------------------------------------------- connection

def _is_local(base_url: str | None) -> bool:
    return bool(base_url) and (urlparse(base_url).hostname or "") in LOCAL_HOSTS


def check_base_url(base_url: str, what: str = "--base_url") -> None:
    """A URL the client can connect to at all; otherwise every request would fail the same way."""
    try:
        parsed = urlparse(base_url)
        parsed.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError as err:
        raise UserError(f"{what}: not a valid URL ({err}): {_without_credentials(base_url)!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{what}: expected http(s)://host[:port][/path], got {_without_credentials(base_url)!r}")


def _without_credentials(text: str) -> str:
    """Text that may hold a user:password@ part, without it (for messages about a bad URL)."""
    head, sep, tail = text.partition("://")
    if sep:
        tail = tail.split("/", 1)
        tail[0] = tail[0].rsplit("@", 1)[-1]
        text = head + sep + "/".join(tail)
    return redact(text)


def public_url(base_url: str | None) -> str | None:
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
