"""SIGKILL a running collection at several points, resume, and compare with an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fake_openai_server import FakeOpenAIServer
from test_teacher import ROOT, SECRET, assert_no_secret, collect, journal_lines, make_data_dir, openai_argv, read_data

N_QUESTIONS = 24


@pytest.fixture(scope="module")
def slow_server():
    with FakeOpenAIServer(latency=0.04) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slow_server):
    """Data dir and the teacher data of an uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    data_dir = make_data_dir(root, n=N_QUESTIONS)
    out = root / "out"
    os.environ["OPENAI_API_KEY"] = SECRET
    try:
        collect(openai_argv(slow_server, data_dir, out, "--concurrency", "2"))
    finally:
        del os.environ["OPENAI_API_KEY"]
    return data_dir, read_data(out)


def count_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def start_and_kill(argv: list[str], journal, kill_after: int) -> tuple[int, str]:
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "query_teacher.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while count_lines(journal) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate()
    return proc.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("kill_after", [1, 7, 18])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, slow_server, reference, kill_after, monkeypatch):
    data_dir, expected = reference
    out = tmp_path / "out"
    argv = openai_argv(slow_server, data_dir, out, "--concurrency", "2")
    code, output = start_and_kill(argv, out / "journal.jsonl", kill_after)
    assert code == -signal.SIGKILL, output  # it was still running: the kill was real
    done_at_kill = len(journal_lines(out))
    assert kill_after <= done_at_kill < N_QUESTIONS
    assert not (out / "teacher_data.json").exists()

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    slow_server.wait_idle()
    slow_server.reset_counts()
    summary = collect(argv)
    assert summary["requests"]["from_journal"] == done_at_kill
    assert slow_server.completed == summary["requests"]["new"] == N_QUESTIONS - done_at_kill  # nothing asked twice
    assert read_data(out) == expected

    records = journal_lines(out)  # every line parses
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == N_QUESTIONS
    assert (out / "journal.jsonl").read_bytes().endswith(b"\n")
    assert_no_secret(out, output)
