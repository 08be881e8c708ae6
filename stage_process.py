"""How the drivers (run_rounds.py, reproduce.py) run their stages: one command at a time, printed first,
its output shown and kept in a log, stopped with the driver, a failure turned into one `error:` line.

A stage of this repo (`python <script>.py ...`) runs in a fork of the driver ("warm stage"): the driver has
imported torch, transformers and the training and generation code once, so a stage starts in well under a
second instead of paying ~5 s of imports (~20 s on a loaded 2-core machine) each time. The child runs the
script exactly as `python <script>.py ...` would (`runpy`, as `__main__`, with that argv, its own session and
output), so the printed command is still the way to re-run it by hand. Any other command (torchrun, a
missing interpreter) and every stage under `LTR_FRESH_STAGES=1` run as ordinary subprocesses.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import mmap
import os
import runpy
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from common import UserError


class StageFailed(UserError):
    """A stage exited non-zero. The driver exits 1 with this line: the stage's own `error:` line says why."""


class Interrupted(Exception):
    """SIGTERM, SIGINT or SIGHUP reached the driver (see `stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """Turn the stop signals into `Interrupted`, so `run_command` stops the running stage before the
    driver exits (a stage lives in its own process group and would not see them otherwise)."""
    def handler(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


@contextmanager
def driver_exits() -> Iterator[None]:
    """How the drivers (run_rounds.py, reproduce.py) end a run that stops partway, with one `error:` line:
    a failed stage exits 1 (its own error line says why), a stop signal 128 + its number. Finished
    stages are kept either way, so the same command continues."""
    stop_on_signals()
    try:
        yield
    except StageFailed as err:  # the stage's own failure, not bad input to the driver (exit 2)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Interrupted as err:
        print(f"error: stopped by {err} (a running stage with it); finished stages are kept: re-run the same "
              f"command to continue", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)


def _die_with_parent():
    """Linux: the kernel sends the stage SIGTERM when the driver dies, even by SIGKILL (no handler runs then)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone


def stop_stage(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the stage's process group (its torchrun workers too), SIGKILL whatever is left after
    `grace` seconds or at a second signal."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except (subprocess.TimeoutExpired, Interrupted, KeyboardInterrupt):
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _output_lines(output: bytes) -> list[str]:
    """A stage's output as lines, progress-bar redraws (\r) split apart."""
    return [line.strip() for line in output.decode("utf-8", errors="replace").replace("\r", "\n").splitlines()]


def _last_error_line(output: bytes) -> str | None:
    errors = [line for line in _output_lines(output) if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else None


# ---------------------------------------------------------------- stages side by side

_console = threading.RLock()  # console writes and forks: a forked stage never inherits a half-held lock
_running: set = set()         # stages running now: a driver that stops, stops them all
_folder_locks: dict[str, threading.Lock] = {}


_workers = 1                  # jobs running at once (run_jobs)


def thread_share(running: int) -> int | None:
    """Torch threads for each of `running` stages side by side: the driver's threads (OMP_NUM_THREADS if set,
    else every core) split evenly. None: one job at a time, so a stage keeps torch's own default."""
    if _workers <= 1:
        return None
    budget = os.environ.get("OMP_NUM_THREADS", "")
    budget = int(budget) if budget.isdigit() and int(budget) > 0 else (os.cpu_count() or 1)
    return max(1, budget // max(1, running))


def _rebalance() -> None:
    """Give the stages running now an even share of the cores (a stage left alone takes them all, so the
    end of a long stage is not run on one core while the other idles). Forked stages only."""
    with _console:
        share = thread_share(len(_running))
        for process in _running:
            if share and isinstance(process, ForkedStage):
                process.set_threads(share)


def say(text: str) -> None:
    """A driver line on the console (drivers print through here while stages may run side by side)."""
    with _console:
        print(text, flush=True)


@contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """One runner per stage folder: a chain that needs a stage another chain is running waits for it, then
    finds its outputs and skips it (round 1's exam and teacher serve every arm)."""
    key = str(Path(folder).resolve())
    with _console:
        lock = _folder_locks.setdefault(key, threading.Lock())
    with lock:
        yield


def run_jobs(jobs: dict[Hashable, tuple[Callable[[], Any], tuple]], workers: int = 1) -> dict[Hashable, Any]:
    """Run `{key: (function, keys it needs first)}`, `workers` at a time, each after what it needs; a job
    that fails stops the running ones (their stages too) and its error is raised. One worker: one after
    another in the given order, output streamed as always. Several (CPU): each stage gets an equal share of
    the cores as torch threads, re-shared as stages start and end (`_rebalance`)."""
    if workers <= 1 or len(jobs) <= 1:
        return {key: function() for key, (function, _) in jobs.items()}
    global _workers
    if warm_stages_enabled():
        preload()  # before any thread starts: a fork never meets an import in progress
    _workers = workers
    results: dict[Hashable, Any] = {}
    pending, running = dict(jobs), {}
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stage")
    try:
        while pending or running:
            for key in [k for k, (_, needs) in pending.items() if all(n in results for n in needs)]:
                if len(running) >= workers:
                    break
                running[pool.submit(pending.pop(key)[0])] = key
            if not running:
                raise RuntimeError(f"jobs wait for jobs that never run: {sorted(map(str, pending))}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
    except BaseException:
        for process in list(_running):
            stop_stage(process)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _workers = 1
    return results


DONE_MARK = "stage took"  # the log's last line: "[stage took 12.3s, exit 0]" (bench/bench_demo.py reads it)


def run_command(argv: list[str], log: Path) -> None:
    """Print the command, run it with output shown and kept in `log`; a failure stops the driver.

    Bytes pass through unchanged so the stage's progress bars redraw in place. The stage runs in
    its own process group, stopped with it if the driver is interrupted. While stages run side by side
    (`run_jobs`), their output goes to their logs only, and the console gets a line when each ends."""
    line = "$ " + " ".join(shlex.quote(a) for a in argv)
    say("\n" + line)
    log.parent.mkdir(parents=True, exist_ok=True)
    tail, started, quiet = b"", time.time(), _workers > 1
    with open(log, "wb") as sink:
        sink.write((line + "\n").encode())  # the log's first line: the command that made the folder (command_of)
        with _console:
            process = start_stage(argv, thread_share(len(_running) + 1))
            _running.add(process)
        _rebalance()
        try:
            while chunk := process.stdout.read1(4096):
                if not quiet:
                    with _console:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                sink.write(chunk)
                tail = (tail + chunk)[-16384:]
            process.wait()
            sink.write(f"\n[{DONE_MARK} {time.time() - started:.1f}s, exit {process.returncode}]\n".encode())
        except BaseException:
            stop_stage(process)
            raise
        finally:
            with _console:
                _running.discard(process)
            _rebalance()
            process.stdout.close()
    if process.returncode != 0:
        code = process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
        reason = _last_error_line(tail)
        raise StageFailed(f"stage {Path(argv[1]).name if len(argv) > 1 else argv[0]} failed ({how})"
                          + (f": {reason}" if reason else "") + f"; its output is in {log}")
    if quiet:
        summary = _last_line(tail)
        say(f"done in {time.time() - started:.0f}s: {log.parent}" + (f" ({summary})" if summary else ""))


def _last_line(output: bytes) -> str:
    """The stage's last line of output that is not a progress bar (its summary), shortened."""
    lines = [line for line in _output_lines(output)
             if line and "|" not in line and not line.startswith(("Loading", "Writing"))]
    return lines[-1][:120] if lines else ""


def command_of(log: Path) -> str | None:
    """The command a stage log was written by (run_command's first line), or None."""
    try:
        with open(log, "rb") as f:
            first = f.readline().decode("utf-8", errors="replace").rstrip("\n")
    except OSError:
        return None
    return first[2:] if first.startswith("$ ") else None


# ---------------------------------------------------------------- warm stages (fork of the driver)

# What a stage process spends its start-up importing; the driver imports it once, before its first fork.
PRELOAD = ("torch", "transformers", "generation", "train_setup", "transformers.models.gptj.modeling_gptj",
           "transformers.models.llama.modeling_llama")
_preloaded = False


def warm_stages_enabled() -> bool:
    return os.environ.get("LTR_FRESH_STAGES", "") in ("", "0") and hasattr(os, "fork")


def is_repo_script(argv: list[str]) -> bool:
    """`python <script>.py ...` with this interpreter: what a warm stage can run in-process."""
    return len(argv) >= 2 and argv[0] == sys.executable and argv[1].endswith(".py") and Path(argv[1]).is_file()


def preload() -> None:
    """Import the stages' heavy modules in the driver, once. A module that fails to import is left for the
    stage itself to report, as it would in a fresh process."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the stage meets the same error and reports it in its own words
            pass


class ForkedStage:
    """The parts of `subprocess.Popen` that `run_command` uses, for a stage run in a fork of the driver."""

    def __init__(self, argv: list[str], threads: int | None = None):
        preload()
        read_fd, write_fd = os.pipe()
        self.returncode: int | None = None
        self._reaping = threading.Lock()  # the stage's thread and a stopping driver may both wait for it
        self._threads = mmap.mmap(-1, 8)   # shared with the child: the torch threads it should use now
        self._threads[:] = struct.pack("q", threads or 0)
        with _console:
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
        die = _die_with_parent()
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
        wanted = os.environ.get("OMP_NUM_THREADS", "")
        if wanted.isdigit() and int(wanted) > 0 and "torch" in sys.modules:  # OpenMP read it at the driver's import
            sys.modules["torch"].set_num_threads(int(wanted))
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


def start_stage(argv: list[str], threads: int | None = None):
    """The running stage, forked from the driver when it is one of our scripts, else a subprocess.
    `threads`: its torch threads (OMP_NUM_THREADS), when stages share the cores."""
    if warm_stages_enabled() and is_repo_script(argv):
        return ForkedStage(argv, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with _console:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent(), env=env)
