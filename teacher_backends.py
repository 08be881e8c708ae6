"""Teacher backends behind one interface (`complete(request) -> Reply`): any OpenAI-compatible
server through the `openai` client, and the offline stand-in built on the dataset's gold
solutions (offline_teacher.py, imported when asked for: the embedded tasks, CI and laptops).
Plus the key and URL handling of the former.
"""
from __future__ import annotations

import os
from typing import Protocol
from urllib.parse import urlparse

from common import UserError, redact
from tasks import TaskSpec
from teacher_journal import Reply, Request, is_empty_reply

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
        from offline_teacher import OfflineTeacher

        return OfflineTeacher(task, args.num_samples, args.offline_error_rate, args.seed)
    return OpenAITeacher(args.teacher_model, base_url, api_key or "dry-run-no-key", args.request_timeout,
                         args.num_samples, args.temperature, args.max_tokens)
