"""The teacher and the round driver on bad input and failures: one clear `error:` line, a non-zero
exit, no traceback, no partial output; a dead teacher stops the run in seconds; a stop signal to
the driver stops its stage too."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from fake_openai_server import FakeOpenAIServer
from test_teacher import ROOT, SECRET, collect, journal_lines, make_data_dir, openai_argv, read_data, teacher_argv

import args as args_mod  # noqa: E402
import driver_args  # noqa: E402
import query_teacher  # noqa: E402
import stages  # noqa: E402
import tasks  # noqa: E402
import teacher  # noqa: E402
from common import UserError  # noqa: E402
from flags import parse  # noqa: E402
from teacher_templates import render  # noqa: E402

BIG = 2 ** 53 + 1  # the first integer a float cannot hold


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("hardening"), n=4)


@pytest.fixture(scope="module")
def questions(data) -> list[str]:
    return [ex.question for ex in tasks.load_split("wordmath", "train", str(data))]


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def closed_port_url() -> str:
    """A local port nothing listens on: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def run_cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["query_teacher.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        query_teacher.main()
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def last_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

FLAG_CASES = [  # (flags, what the error line must name)
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--request_timeout", "0"], "--request_timeout"),
    (["--request_timeout", "nan"], "--request_timeout"),
    (["--backoff_base", "-1"], "--backoff_base"),
    (["--backoff_base", "inf"], "--backoff_base"),
    (["--max_cost", "nan"], "--max_cost"),
    (["--max_cost", "0"], "--max_cost"),
    (["--max_cost", "inf"], "--max_cost"),
    (["--prompt_price_per_1m", "-1"], "--prompt_price_per_1m"),
    (["--completion_price_per_1m", "nan"], "--completion_price_per_1m"),
    (["--num_samples", "0"], "--num_samples"),
    (["--num_samples", "nan"], "--num_samples"),
    (["--max_tokens", "0"], "--max_tokens"),
    (["--concurrency", "0"], "--concurrency"),
    (["--max_retries", "-1"], "--max_retries"),
    (["--est_completion_tokens", "0"], "--est_completion_tokens"),
    (["--max_consecutive_failures", "-1"], "--max_consecutive_failures"),
    (["--max_requests", "0"], "--max_requests"),
    (["--offline_error_rate", "nan"], "--offline_error_rate"),
    (["--base_url", "localhost:8000/v1"], "--base_url"),
    (["--base_url", "http://"], "--base_url"),
    (["--base_url", "http://127.0.0.1:99999/v1"], "--base_url"),
    (["--student_wrong", "sw.json"], "--student_wrong"),  # annotate mode does not read it
]


@pytest.mark.parametrize("flags, names", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag_values(tmp_path, data, monkeypatch, capsys, flags, names):
    out = tmp_path / "o"
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data, out, "--backend", "offline", *flags))
    assert code == 2
    assert_one_error_line(err, names)
    assert not out.exists()


def test_round_driver_builds_teacher_arguments_that_check_themselves():
    """The driver constructs TeacherArguments directly (no parser): the checks are in __post_init__."""
    for bad in ({"temperature": float("nan")}, {"num_samples": 0}, {"request_timeout": float("inf")},
                {"max_consecutive_failures": -1}, {"base_url": "127.0.0.1:8000"}):
        with pytest.raises(UserError, match=f"--{next(iter(bad))}"):
            args_mod.TeacherArguments(**bad)


@pytest.mark.parametrize("flags, names", [
    (["--base_url", "not a url"], "--base_url"),
    (["--max_consecutive_failures", "-2"], "--max_consecutive_failures"),
    (["--teacher_samples", "0"], "--teacher_samples"),
    (["--max_cost", "nan"], "--max_cost"),
])
def test_round_driver_rejects_bad_teacher_settings_up_front(tmp_path, flags, names):
    with pytest.raises(UserError, match=names):
        parse(driver_args.RoundsArguments, ["--workdir", str(tmp_path / "w"), *flags])


def test_bad_openai_base_url_from_the_environment(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", "ftp://example.com/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data, tmp_path / "o"))
    assert code == 2
    assert_one_error_line(err, "OPENAI_BASE_URL")
    assert SECRET not in err and not (tmp_path / "o").exists()


def test_price_table_with_nan(tmp_path, data, monkeypatch, capsys):
    table = tmp_path / "prices.json"
    table.write_text('{"gpt-3.5-turbo": {"prompt_per_1m": NaN, "completion_per_1m": 1}}')  # json.loads takes NaN
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data, tmp_path / "o", "--price_table", str(table),
                                                           "--dry_run"))
    assert code == 2
    assert_one_error_line(err, "--price_table", str(table), "gpt-3.5-turbo")


STUDENT_WRONG_CASES = [  # (student_wrong.json text, or a function of the split's questions; what the line names)
    ("{}", "holds no questions"),
    ("[]", "expected {question"),
    (lambda q: json.dumps({q[0]: ["  ", ""], q[1]: []}), "every wrong rationale in it is blank"),
    (lambda q: json.dumps({"": ["Therefore, the answer is 1."]}), "empty or blank"),
    (lambda q: json.dumps({" \t": ["Therefore, the answer is 1."], q[0]: ["x"]}), "empty or blank"),
    (lambda q: json.dumps({q[0]: None}), "got null"),
    (lambda q: json.dumps({q[0]: "Therefore, the answer is 1."}), "got a string"),
    (lambda q: json.dumps({q[0]: [None]}), "got null"),
    (lambda q: json.dumps({q[0]: [7]}), "got a number"),
    (lambda q: json.dumps({q[0][:-1] + "\ud800": ["x"]}), "lone surrogate"),
    (lambda q: json.dumps({q[0]: ["So it is \udc80 5."]}), "lone surrogate"),
    (lambda q: json.dumps({"Who asked this?": ["Therefore, the answer is 1."]}), "not in the split"),
    ("{\"q\": [", "malformed JSON"),
]


@pytest.mark.parametrize("content, names", STUDENT_WRONG_CASES, ids=[
    "empty-object", "a-list", "all-blank-rationales", "empty-question", "blank-question", "null-rationales",
    "string-not-list", "null-rationale", "number-rationale", "surrogate-question", "surrogate-rationale",
    "unknown-question", "malformed"])
def test_bad_student_wrong_files(tmp_path, data, questions, monkeypatch, capsys, content, names):
    path = tmp_path / "student_wrong.json"
    path.write_text(content(questions) if callable(content) else content, encoding="utf-8")
    out = tmp_path / "o"
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data, out, "--backend", "offline", "--mode", "feedback",
                                                           "--student_wrong", str(path)))
    assert code == 2
    assert_one_error_line(err, str(path), names)
    assert not out.exists()


def test_nothing_left_after_skipping_unknown_questions(tmp_path, data, monkeypatch, capsys):
    path = tmp_path / "student_wrong.json"
    path.write_text(json.dumps({"Who asked this?": ["Therefore, the answer is 1."]}))
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data, tmp_path / "o", "--backend", "offline", "--mode",
                                                           "feedback", "--student_wrong", str(path),
                                                           "--skip_unknown_questions"))
    assert code == 2
    assert_one_error_line(err, str(path), "nothing to ask")
    assert not (tmp_path / "o").exists()


def test_whitespace_variants_of_a_question_are_one_question(tmp_path, data, questions):
    path = tmp_path / "student_wrong.json"
    path.write_text(json.dumps({questions[0]: ["Therefore, the answer is 1."],
                                "  " + questions[0].replace(" ", "  "): ["Therefore, the answer is 2."]}))
    summary = collect(teacher_argv(data, tmp_path / "o", "--backend", "offline", "--mode", "feedback",
                                   "--student_wrong", str(path)))
    assert summary["requests"]["total"] == 2  # both wrong rationales kept, neither key overwrote the other


@pytest.mark.parametrize("rows, names", [
    ([{"question": "Tom has 3 \ud800 apples.", "answer": "3 apples.\n#### 3"}], "lone surrogate"),
    ([{"question": "   ", "answer": "#### 3"}], "empty question"),
    ([], "is empty"),
], ids=["surrogate-question", "blank-question", "empty-split"])
def test_bad_split_items(tmp_path, monkeypatch, capsys, rows, names):
    data_dir = tmp_path / "data"
    path = data_dir / "wordmath" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ASCII escapes: "\ud800" survives as JSON
    code, err = run_cli(monkeypatch, capsys, teacher_argv(data_dir, tmp_path / "o", "--backend", "offline",
                                                           "--offline_error_rate", "0"))
    assert code == 2
    assert_one_error_line(err, str(path), names)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- gold answers beyond a float's 53 bits

def test_big_integer_gold_reaches_the_teacher_exactly(tmp_path, server, with_key):
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "wordmath" / "train.jsonl",
                [{"question": "A ledger holds a huge count. What is it?", "answer": f"It is {BIG}.\n#### {BIG:,}"}])
    ex = tasks.load_split("wordmath", "train", str(data_dir))[0]
    assert ex.gold == str(BIG)
    assert f"Correct answer: {BIG}\n" in render("annotate", tasks.get_task("wordmath"), ex).messages[1]["content"]
    out = tmp_path / "o"
    collect(openai_argv(server, data_dir, out))  # the fake teacher answers with the gold it was shown
    (rationales,) = read_data(out).values()
    assert rationales and all(r.endswith(f"Therefore, the answer is {BIG}.") for r in rationales)
    assert journal_lines(out)[0]["gold"] == str(BIG)


# ---------------------------------------------------------------- failures: outputs kept, exit 1

def test_exhausted_retries_exit_1_after_writing_what_succeeded(tmp_path, data, questions, server, with_key,
                                                               monkeypatch, capsys):
    server.always[questions[1]] = "500"
    out = tmp_path / "o"
    code, err = run_cli(monkeypatch, capsys, openai_argv(server, data, out, "--max_retries", "1"))
    assert code == 1
    line = last_error_line(err)
    assert line.startswith("error: 1 of 4 requests failed (gave up after 2 attempts: HTTP 500")
    assert "re-run the same command" in line and "the 3 replies so far are journaled" in line
    assert len(read_data(out)) == 3 and len(journal_lines(out)) == 3
    assert json.loads((out / "summary.json").read_text())["failure"] and stages.teacher_result(out) is None


def test_dead_teacher_stops_at_once_cli(tmp_path, data, with_key):
    """Connection refused on every attempt: the run stops after 5, not after retrying every request."""
    out = tmp_path / "o"
    started = time.time()
    result = subprocess.run([sys.executable, "query_teacher.py", *teacher_argv(
        data, out, "--base_url", closed_port_url(), "--backoff_base", "0.05", "--max_retries", "20")],
        cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": SECRET}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    line = last_error_line(result.stderr)
    assert line.startswith("error: 4 of 4 requests failed (teacher unreachable: 5 connection failures in a row")
    assert "no reply was collected" in line
    assert time.time() - started < 30
    assert not out.exists()  # nothing was collected: no trace
    assert SECRET not in result.stdout + result.stderr


def test_dead_teacher_keeps_what_succeeded_and_resumes(tmp_path, data, questions, server, with_key):
    """The server answers two questions, then drops every connection: the run stops after 5 failed
    attempts in a row, the two replies are journaled, and a re-run asks only the rest."""
    for question in questions[2:]:
        server.always[question] = "drop"
    out = tmp_path / "o"
    with pytest.raises(teacher.CollectionFailed, match="2 of 4 requests failed .*teacher unreachable") as failed:
        collect(openai_argv(server, data, out, "--concurrency", "1", "--max_retries", "50"))
    summary = failed.value.summary
    assert summary["requests"]["new"] == 2 and summary["requests"]["failed"] == 1
    assert summary["requests"]["not_run"] == 1 and summary["stopped_early"]
    assert server.attempts == 2 + 5
    assert len(journal_lines(out)) == 2 and sorted(read_data(out)) == sorted(questions[:2])
    assert stages.teacher_result(out) is None

    server.always.clear()
    server.reset_counts()
    summary = collect(openai_argv(server, data, out))
    assert server.completed == 2 and summary["requests"]["from_journal"] == 2 and len(read_data(out)) == 4


def test_any_answer_resets_the_count(tmp_path, data, server, with_key):
    """Dropped connections between answers (a flaky network) are retried, not taken for a dead teacher."""
    server.inject("drop", "drop", "drop", "drop", "500", "drop", "drop", "drop", "drop")
    summary = collect(openai_argv(server, data, tmp_path / "o", "--concurrency", "1", "--max_retries", "9",
                                  "--backoff_base", "0.001"))
    assert summary["requests"]["new"] == 4 and not summary["stopped_early"]


# ---------------------------------------------------------------- empty replies are failed attempts

@pytest.mark.parametrize("fault", ["empty", "blank", "nochoices"])
def test_empty_reply_is_retried(tmp_path, data, server, with_key, fault):
    server.inject(fault)
    out = tmp_path / "o"
    summary = collect(openai_argv(server, data, out, "--concurrency", "1"))
    assert summary["requests"] == {"total": 4, "from_journal": 0, "new": 4, "failed": 0, "not_run": 0}
    assert server.attempts == 5 and summary["samples"]["kept"] == 8
    records = journal_lines(out)
    assert len(records) == 4 and all(any(t.strip() for t in r["texts"]) for r in records)


def test_empty_reply_in_an_old_journal_is_asked_again(tmp_path, data, questions, server, with_key):
    out = tmp_path / "o"
    collect(openai_argv(server, data, out))
    records = journal_lines(out)
    records[0]["texts"] = ["", "  "]  # as an older version journaled an empty 200
    (out / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    server.reset_counts()
    summary = collect(openai_argv(server, data, out))
    assert server.completed == 1 and summary["requests"]["from_journal"] == 3 and summary["requests"]["new"] == 1
    assert len(read_data(out)) == 4
    assert teacher.Journal(out / "journal.jsonl").load()[records[0]["key"]]["texts"][0].strip()


# ---------------------------------------------------------------- the round driver

def driver_argv(data_dir: Path, workdir: Path, *extra: str) -> list[str]:
    return ["run_rounds.py", "--task", "wordmath", "--data_dir", str(data_dir), "--student", str(workdir / "student"),
            "--workdir", str(workdir), "--rounds", "1", "--arms", "lm", "--eval_splits", "test",
            "--backend", "openai", "--teacher_model", "fake-teacher", "--lr", "1e-3", "--cl_p", "0.1", *extra]


def round_one_up_to_the_teacher(tmp_path: Path) -> tuple[Path, Path]:
    """A workdir whose round-0 evaluation and round-1 exam are done, so the first stage the driver
    runs is the teacher's (no model is loaded: the student folder only has the shape the driver checks)."""
    data_dir = make_data_dir(tmp_path, n=6)
    student = tmp_path / "runs" / "student"
    student.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (student / name).write_text("{}")
    for split in ("validation", "test"):  # the embedded task's data counts as prepared
        (data_dir / "wordmath" / f"{split}.jsonl").write_text((data_dir / "wordmath" / "train.jsonl").read_text())
    workdir = tmp_path / "runs"
    eval_dir = workdir / "round0" / "eval_test"
    eval_dir.mkdir(parents=True)
    (eval_dir / "Acc0.5.json").write_text(json.dumps({"accuracy": 0.5, "strict_accuracy": 0.5, "correct": 3,
                                                      "total": 6}))
    exam_dir = workdir / "round1" / "exam"
    exam_dir.mkdir(parents=True)
    (exam_dir / "summary.json").write_text(json.dumps({"accuracy": 0.5, "questions_with_mistakes": 0,
                                                       "wrong_rationales": 0}))
    (exam_dir / "student_wrong.json").write_text("{}")
    return data_dir, workdir


def test_round_driver_stops_when_the_teacher_is_dead(tmp_path):
    data_dir, workdir = round_one_up_to_the_teacher(tmp_path)
    result = subprocess.run([sys.executable, *driver_argv(data_dir, workdir, "--base_url", closed_port_url())],
                            cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": SECRET}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    line = last_error_line(result.stderr)
    assert line.startswith("error: stage query_teacher.py failed (exit 1): 6 of 6 requests failed (teacher "
                           "unreachable"), line
    assert "round1/teacher/log.txt" in line
    assert "run_trainer.py" not in result.stdout  # the loop stopped there
    assert not (workdir / "round1" / "teacher" / "summary.json").exists()


def child_pids(pid: int) -> list[int]:
    """Children of every thread of `pid` (the driver starts side-by-side stages from worker threads)."""
    children = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(p) for p in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads children from /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_stopping_the_driver_stops_its_stage(tmp_path, signum):
    """The teacher stage hangs on a slow server; a signal to the driver alone (not its group) stops it."""
    data_dir, workdir = round_one_up_to_the_teacher(tmp_path)
    with FakeOpenAIServer(slow_s=60) as server:
        server.always["Question:"] = "slow"
        driver = subprocess.Popen([sys.executable, *driver_argv(data_dir, workdir, "--base_url", server.url)],
                                  cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": SECRET}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 60
            while server.attempts == 0 and driver.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            stages = child_pids(driver.pid)
            assert server.attempts and len(stages) == 1, driver.poll()
            driver.send_signal(signum)
            _, err = driver.communicate(timeout=20)
            deadline = time.time() + 10
            while alive(stages[0]) and time.time() < deadline:
                time.sleep(0.05)
            assert not alive(stages[0]), "the teacher stage outlived the driver"
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    if signum == signal.SIGKILL:
        assert driver.returncode == -signal.SIGKILL  # no handler runs: the kernel stopped the stage (PDEATHSIG)
    else:
        assert driver.returncode == 128 + signum
        assert_one_error_line(err, f"stopped by {signal.Signals(signum).name}", "re-run the same command")
