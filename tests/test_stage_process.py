"""How the drivers run stages: forked "warm" stages behave as fresh processes, side-by-side jobs keep their
order and dependencies, share the cores, and a failing job stops the others."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import stage_process
import warm_stage
from conftest import ROOT, run_script
from stage_process import StageFailed, run_command, run_jobs


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage commands name their scripts relative to the repo, as the drivers do


def test_a_forked_stage_is_the_script_run_by_hand(tmp_path):
    """A repo script runs in a fork (same exit code, same error line, output in the log), anything else
    as a subprocess; LTR_FRESH_STAGES=1 turns the fork off."""
    assert warm_stage.is_repo_script([sys.executable, "query_teacher.py", "--help"])
    assert not warm_stage.is_repo_script([sys.executable, "-c", "print(1)"])
    assert not warm_stage.is_repo_script(["torchrun", "run_trainer.py"])
    log = tmp_path / "bad" / "log.txt"
    with pytest.raises(StageFailed, match=r"query_teacher.py failed \(exit 2\): argument --mode: invalid choice"):
        run_command([sys.executable, "query_teacher.py", "--mode", "nope"], log)
    text = log.read_text()
    assert text.startswith(f"$ {sys.executable} query_teacher.py --mode nope\n")
    assert "error: argument --mode" in text and text.rstrip().endswith("exit 2]")
    run_command([sys.executable, "query_teacher.py", "--help"], tmp_path / "help" / "log.txt")
    assert "--mode" in (tmp_path / "help" / "log.txt").read_text()
    # an uncaught exception: a traceback and exit 1, as from a fresh interpreter
    script = tmp_path / "crash.py"
    script.write_text("import sys\nprint('argv', sys.argv[1:])\nraise ValueError('boom')\n")
    with pytest.raises(StageFailed, match=r"crash.py failed \(exit 1\)"):
        run_command([sys.executable, str(script), "x"], tmp_path / "crash" / "log.txt")
    text = (tmp_path / "crash" / "log.txt").read_text()
    assert "argv ['x']" in text and "ValueError: boom" in text


def test_warm_and_fresh_stages_write_the_same_results(tiny_student, data_dir, tmp_path):
    argv = ["infer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(tiny_student),
            "--test_on", "validation", "--limit", "6", "--batch", "3"]
    run_command([sys.executable, *argv, "--output_dir", str(tmp_path / "warm")], tmp_path / "warm" / "log.txt")
    fresh = run_script(*argv, "--output_dir", str(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    warm, = (tmp_path / "warm").glob("Acc*.json")
    cold, = (tmp_path / "fresh").glob("Acc*.json")
    assert warm.name == cold.name
    assert json.loads(warm.read_text())["results"] == json.loads(cold.read_text())["results"]


def test_a_process_that_ran_multithreaded_ops_starts_stages_that_do_not_hang(tmp_path):
    """OpenMP's worker threads do not survive a fork: a stage forked from a process that has run a two-thread op
    hung at its first parallel region. Such a process gets fresh stages; a driver (torch first imported by the
    preload) stays at one thread itself and forks, its stages back at the default thread count."""
    stage = tmp_path / "stage.py"
    stage.write_text("import os, torch\n(torch.ones(600, 600) @ torch.ones(600, 600)).sum()\n"
                     "print('threads', torch.get_num_threads(), 'pid', os.getpid())\n")
    probe = tmp_path / "probe.py"
    probe.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import warm_stage
import stage_process
from pathlib import Path
if sys.argv[1] == "used":
    import torch
    torch.set_num_threads(2)
    (torch.ones(600, 600) @ torch.ones(600, 600)).sum()
stage_process.run_command([sys.executable, {str(stage)!r}], Path(sys.argv[2]))
import torch
print("driver threads", torch.get_num_threads(), "forked", warm_stage._fork_safe, "pid", os.getpid())
""")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for case in ("used", "driver"):
        log = tmp_path / case / "log.txt"
        done = subprocess.run([sys.executable, str(probe), case, str(log)], capture_output=True, text=True, timeout=120,
                              env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        forked = "forked True" in done.stdout
        assert forked == (case == "driver" or (os.cpu_count() or 1) == 1), done.stdout
        assert "threads" in log.read_text()
        if case == "driver":  # the driver keeps to one thread; its stage gets the default back
            default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                         capture_output=True, text=True, env=env).stdout)
            assert "driver threads 1 " in done.stdout and f"threads {default} pid" in log.read_text()


def test_jobs_run_after_what_they_need_and_at_most_workers_at_once():
    running, most, order, lock = set(), [0], [], threading.Lock()

    def job(name, seconds=0.05):
        def run():
            with lock:
                running.add(name)
                most[0] = max(most[0], len(running))
                order.append(("start", name))
            time.sleep(seconds)
            with lock:
                running.discard(name)
                order.append(("end", name))
            return name.upper()
        return run

    jobs = {"a": (job("a", 0.2), ()), "b": (job("b"), ()), "c": (job("c"), ("a",)), "d": (job("d"), ("b", "c"))}
    assert run_jobs(jobs, workers=2) == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert most[0] == 2
    for before, after in (("a", "c"), ("b", "d"), ("c", "d")):
        assert order.index(("end", before)) < order.index(("start", after))
    order.clear()
    run_jobs(jobs, workers=1)  # one worker: the given order, one at a time
    assert [name for what, name in order if what == "start"] == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="never run"):
        run_jobs({"x": (job("x"), ("missing",)), "y": (job("y"), ())}, workers=2)


def test_a_failing_job_stops_the_stage_running_beside_it(tmp_path):
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    started = time.time()
    with pytest.raises(StageFailed, match="bad.py failed"):
        run_jobs({"slow": (lambda: run_command(slow, tmp_path / "slow" / "log.txt"), ()),
                  "bad": (lambda: (time.sleep(0.5), run_command([sys.executable, str(tmp_path / "bad.py")],
                                                                tmp_path / "bad" / "log.txt")), ())}, workers=2)
    assert time.time() - started < 30 and not stage_process._running
    assert "started" in (tmp_path / "slow" / "log.txt").read_text()


def test_side_by_side_stages_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert stage_process.thread_share(2) is None  # one job at a time: the library's default
    monkeypatch.setattr(stage_process, "_workers", 2)
    assert [stage_process.thread_share(n) for n in (1, 2, 3)] == [8, 4, 2]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the driver's own budget
    assert [stage_process.thread_share(n) for n in (1, 2, 3)] == [2, 1, 1]


def test_a_forked_stage_takes_a_new_thread_share_while_it_runs(tmp_path):
    script = tmp_path / "threads.py"
    script.write_text("import sys, time, torch\nprint('at start', torch.get_num_threads(), flush=True)\n"
                      "deadline = time.time() + 20\n"
                      "while torch.get_num_threads() != 2 and time.time() < deadline:\n    time.sleep(0.01)\n"
                      "print('later', torch.get_num_threads(), flush=True)\n")
    warm_stage.preload()
    stage = warm_stage.ForkedStage([sys.executable, str(script)], threads=1)
    time.sleep(0.5)
    stage.set_threads(2)
    output = stage.stdout.read().decode()
    assert stage.wait(30) == 0, output
    assert "at start 1" in output and "later 2" in output


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="tells a live build by /proc/<pid>/cwd (Linux)")
def test_a_stale_op_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """A DeepSpeed op build killed partway leaves torch_extensions/<op>/lock, and every later ZeRO run waited
    on it forever. Old and unattended: removed, with a note. Fresh, or with a build working in its folder: kept."""
    import subprocess

    import distributed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks = {}
    for name in ("stale", "fresh", "building"):
        (tmp_path / name).mkdir()
        locks[name] = tmp_path / name / "lock"
        locks[name].touch()
    old = time.time() - 3600
    for name in ("stale", "building"):
        os.utime(locks[name], (old, old))
    builder = subprocess.Popen(["sleep", "30"], cwd=tmp_path / "building")
    try:
        assert distributed.clear_stale_build_locks() == [locks["stale"]]
    finally:
        builder.kill()
        builder.wait()
    assert not locks["stale"].exists() and locks["fresh"].exists() and locks["building"].exists()
    assert "stale build lock" in capsys.readouterr().out
