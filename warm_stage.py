"""Warm stages: a stage of this repo run in a fork of the driver, which imported the stages' heavy modules once.

The child becomes `python <script>.py ...` as far as the script can tell (`runpy`, as `__main__`, that argv, its
own session, output pipe and exit code), so the printed command re-runs it the same by hand. stage_process.py
decides when a stage forks and supervises it like any subprocess.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import mmap
import os
import runpy
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

console = threading.RLock()  # console writes and forks: a forked stage never inherits a half-held lock


def die_with_parent():
    """Linux: the kernel sends the stage SIGTERM when the driver dies, even by SIGKILL (no handler runs then)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


# What a stage process spends its start-up importing; the driver imports it once, before its first fork.
PRELOAD = ("torch", "transformers", "generation", "train_setup", "transformers.models.gptj.modeling_gptj",
           "transformers.models.llama.modeling_llama")
_preloaded = False
_fork_safe = False
_stage_threads = 0  # torch threads a stage starts with when no share is set: the driver's default


def warm_stages_enabled() -> bool:
    return os.environ.get("LTR_FRESH_STAGES", "") in ("", "0") and hasattr(os, "fork")


def is_repo_script(argv: list[str]) -> bool:
    """`python <script>.py ...` with this interpreter: what a warm stage can run in-process."""
    return len(argv) >= 2 and argv[0] == sys.executable and argv[1].endswith(".py") and Path(argv[1]).is_file()


def preload() -> None:
    """Import the stages' heavy modules in the driver, once. A module that fails to import is left for the
    stage itself to report, as it would in a fresh process."""
    global _preloaded, _fork_safe, _stage_threads
    if _preloaded:
        return
    _preloaded = True
    torch_was_imported = "torch" in sys.modules
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the stage meets the same error and reports it in its own words
            pass
    torch = sys.modules.get("torch")
    if torch is None:
        return
    # OpenMP's worker threads do not survive a fork: the child of a process that has run a multi-threaded op hangs
    # at its first parallel region. A driver runs no ops itself: one thread keeps it from ever starting that pool,
    # and its stages get the default back. A process that imported torch before (a test session, a library user)
    # may have started the pool already: its stages fork only if it has kept to one thread.
    _stage_threads = torch.get_num_threads()
    if torch_was_imported:
        _fork_safe = _stage_threads == 1
    else:
        torch.set_num_threads(1)
        _fork_safe = True


def fork_is_safe() -> bool:
    preload()
    return _fork_safe


class ForkedStage:
    """The parts of `subprocess.Popen` that `run_command` uses, for a stage run in a fork of the driver."""

    def __init__(self, argv: list[str], threads: int | None = None):
        preload()
        read_fd, write_fd = os.pipe()
        self.returncode: int | None = None
        self._reaping = threading.Lock()  # the stage's thread and a stopping driver may both wait for it
        self._threads = mmap.mmap(-1, 8)   # shared with the child: the torch threads it should use now
        self._threads[:] = struct.pack("q", threads or 0)
        with console:
            sys.stdout.flush()
            sys.stderr.flush()
            # SIGUSR1 ("re-read your thread count") stays blocked until the child has its handler
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                self.pid = os.fork()
                if self.pid == 0:  # the stage; never returns
                    os.close(read_fd)
                    _run_stage_in_child(argv, write_fd, threads, self._threads)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        os.close(write_fd)
        self.stdout = os.fdopen(read_fd, "rb")

    def set_threads(self, threads: int) -> None:
        if struct.unpack("q", self._threads[:])[0] != threads and self.returncode is None:
            self._threads[:] = struct.pack("q", threads)
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def poll(self) -> int | None:
        with self._reaping:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"stage {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


def _run_stage_in_child(argv: list[str], output_fd: int, threads: int | None, shared: mmap.mmap) -> None:
    """In the forked child: become `python argv[1] argv[2:]` as far as the script can tell, run it, exit."""
    code = 1
    try:
        os.setsid()  # its own process group, as start_new_session=True: stop_stage signals the group
        die = die_with_parent()
        if die:
            die()
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        # new stream objects on the pipe, as a fresh interpreter has (the driver's may hold other threads' state)
        encoding = sys.stdout.encoding or "utf-8"
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                                       errors="backslashreplace", line_buffering=True)
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the driver's handlers raise Interrupted
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def take_thread_share(signum=None, frame=None):  # runs between ops, in the main thread
            wanted = struct.unpack("q", shared[:])[0]
            if wanted > 0 and "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(wanted)

        signal.signal(signal.SIGUSR1, take_thread_share)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        wanted = os.environ.get("OMP_NUM_THREADS", "")  # OpenMP read it at the driver's import
        wanted = int(wanted) if wanted.isdigit() and int(wanted) > 0 else _stage_threads
        if wanted and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(wanted)
        script = os.path.abspath(argv[1])
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what a fresh interpreter would print for an uncaught exception
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # a fresh interpreter runs them at exit too (TensorBoard writers, ...)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
