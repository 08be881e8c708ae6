"""Small helpers every script shares: user errors, atomic files, secrets, CLI entry."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


class DiskFull(UserError):
    """No space (or quota) left while writing `path`: one line, and a re-run continues once space is freed."""

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(f"{path}: no space left on device{f' ({detail})' if detail else ''}; free some space and run "
                         f"the same command again: finished work is kept")


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as libraries that do not raise OSError word it (safetensors' StorageFull, torch.save's
    failed stream write)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, holder: str, enabled: bool = True) -> Iterator[None]:
    """`lock_folder` for the length of a block (enabled: only one process of a multi-process run takes it)."""
    fd = lock_folder(folder, holder) if enabled else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def lock_folder(folder: str | os.PathLike, holder: str) -> int:
    """An exclusive lock on the folder itself (flock on its descriptor): no lock file is left behind, and the kernel
    releases it when the holder dies, even by SIGKILL, so a killed run never leaves a stale lock. Returns the
    descriptor to keep open while writing; a second writer gets one line naming the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder}: another {holder} is writing there; wait for it to finish, or choose another folder") from None
    return fd


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
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(err):
            raise DiskFull(path) from None
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
