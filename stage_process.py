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

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from common import UserError
from warm_stage import ForkedStage, console, die_with_parent, fork_is_safe, is_repo_script, preload, warm_stages_enabled


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
    with console:
        share = thread_share(len(_running))
        for process in _running:
            if share and isinstance(process, ForkedStage):
                process.set_threads(share)


def say(text: str) -> None:
    """A driver line on the console (drivers print through here while stages may run side by side)."""
    with console:
        print(text, flush=True)


@contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """One runner per stage folder: a chain that needs a stage another chain is running waits for it, then
    finds its outputs and skips it (round 1's exam and teacher serve every arm)."""
    key = str(Path(folder).resolve())
    with console:
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
        with console:
            process = start_stage(argv, thread_share(len(_running) + 1))
            _running.add(process)
        _rebalance()
        try:
            while chunk := process.stdout.read1(4096):
                if not quiet:
                    with console:
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
            with console:
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


def start_stage(argv: list[str], threads: int | None = None):
    """The running stage, forked from the driver when it is one of our scripts, else a subprocess.
    `threads`: its torch threads (OMP_NUM_THREADS), when stages share the cores."""
    if warm_stages_enabled() and is_repo_script(argv) and fork_is_safe():
        return ForkedStage(argv, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with console:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent(), env=env)
