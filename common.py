"""Small helpers every script shares: user errors, atomic files, secrets, CLI entry."""
from __future__ import annotations

import functools
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def cli_main(main: Callable[[], Any]) -> Callable[[], None]:
    """Wrap a script's main so a UserError becomes one clear line and a non-zero exit."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when results could not be written there: the path (or a folder above it)
    is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{flag}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{flag}: cannot write in {folder}")
            return


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: malformed JSON ({err})") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
    return rows


_SECRET_NAME = re.compile(r"(api_?key|secret|password|passwd|auth|(^|_)token)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,})")


def redact(obj: Any) -> Any:
    """Copy of a config with anything that looks like a credential replaced, for files and logs."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_NAME.search(str(k)) and isinstance(v, str) and v
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("<redacted>", obj)
    return obj


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def looks_local(path: str) -> bool:
    """Hub names are 'org/name'; anything else, or a path under an existing folder here, is local."""
    return (path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
            or os.path.isdir(path.split("/")[0]))
