"""Teacher requests and what they cost: request keys, token estimates, prices, and the journal.

A request's key hashes everything that shapes its answer (backend, model, template, prompt,
sampling parameters), so the journal answers a repeated request instead of the teacher.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from common import DiskFull, UserError, is_disk_full, lock_folder, read_json
from tasks import Example
from teacher_templates import Prompt

OFFLINE_MODEL = "offline-v1"  # bump when the offline teacher's output changes: it is part of every key
CHARS_PER_TOKEN = 4           # rough token estimate for dry runs and the offline backend


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


def is_empty_reply(texts) -> bool:
    """No choice holds any text: a failed attempt, never a final answer (neither new nor from a journal)."""
    return not isinstance(texts, list) or not any(isinstance(t, str) and t.strip() for t in texts)


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
            prices = (float(entry["prompt_per_1m"]), float(entry["completion_per_1m"]))
        except (KeyError, TypeError, ValueError):
            prices = None
        if prices is None or not all(math.isfinite(p) and p >= 0 for p in prices):
            raise UserError(f"--price_table: {path}: model {model!r} needs prompt_per_1m and completion_per_1m "
                            f"as numbers >= 0")
        table[model] = prices
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
        self._lock_fd = lock_folder(self.path.parent, "teacher collection")

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
            # An empty reply journaled by an older version is asked again; the new record, appended
            # after it, is the one that counts.
            if isinstance(record, dict) and "key" in record and not is_empty_reply(record.get("texts")):
                records.setdefault(record["key"], record)
        return records

    def append(self, record: dict) -> None:
        """Thread-safe: the collector appends from worker threads so fsync does not stall the event loop. A write
        that fails partway (a full disk) is cut back off, so the file still ends on a whole record."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._write_lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                if os.write(self._fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(self._fd)
            except OSError as err:
                try:
                    os.ftruncate(self._fd, end)
                except OSError:
                    pass
                if is_disk_full(err):
                    raise DiskFull(self.path) from None
                raise

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
