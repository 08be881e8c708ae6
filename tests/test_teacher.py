"""Teacher: offline backend, reply filter, journal, and the real openai client against a fake server."""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import args as args_mod  # noqa: E402

import flags  # noqa: E402
import query_teacher  # noqa: E402
import stages  # noqa: E402
import tasks  # noqa: E402
import teacher  # noqa: E402
import offline_teacher  # noqa: E402
import teacher_collect  # noqa: E402
import teacher_journal  # noqa: E402
import wordmath  # noqa: E402
from common import UserError  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"


# ---------------------------------------------------------------- helpers (also used by test_teacher_resume.py)

def make_data_dir(root: Path, n: int = 8, seed: int = 3) -> Path:
    """A tmp data_dir holding wordmath/train.jsonl with n generated problems."""
    data_dir = root / "data"
    (data_dir / "wordmath").mkdir(parents=True, exist_ok=True)
    rows = wordmath.generate(n, seed=seed)
    (data_dir / "wordmath" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def teacher_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "wordmath", "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


def openai_argv(server: FakeOpenAIServer, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return teacher_argv(data_dir, out, "--backend", "openai", "--base_url", server.url, "--backoff_base", "0.01",
                        "--request_timeout", "5", *extra)


def collect(argv: list[str]) -> dict:
    return teacher.run_collection(flags.parse(args_mod.TeacherArguments, argv))


def read_data(out: Path) -> dict:
    return json.loads((out / "teacher_data.json").read_text())


def journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]


def assert_no_secret(out: Path, *texts: str) -> None:
    for path in out.rglob("*") if out.exists() else []:
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    for text in texts:
        assert SECRET not in text


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# ---------------------------------------------------------------- offline backend

GOLD = ("Zoe starts with 4 stamps. She gets 8 more, so 4 + 8 = 12. She gives away 4, so 12 - 4 = 8. "
        "She gets 7 more, so 8 + 7 = 15.")


@pytest.mark.parametrize("wrong, expected", [
    ("Zoe has 4. 4 + 8 = 13. 13 - 4 = 9. 9 + 7 = 16. Therefore, the answer is 16.",
     "The step 4 + 8 = 13 is wrong: 4 + 8 = 12."),
    ("Zoe has 4. 4 + 8 = 12. 12 + 4 = 16. 16 + 7 = 23. Therefore, the answer is 23.",
     "The step 12 + 4 = 16 is wrong: it should be 12 - 4 = 8."),
    ("Zoe has 5. 5 + 8 = 13. 13 - 4 = 9. Therefore, the answer is 9.",
     "The step 5 + 8 = 13 should start from 4: 4 + 8 = 12."),
    ("4 + 8 = 12. 12 - 4 = 8. Therefore, the answer is 8.",
     "The steps shown are right, but they stop too early, so the final answer 8 is wrong."),
    ("She has many stamps. Therefore, the answer is 7.", "The final answer 7 is wrong; the correct answer is 15."),
    ("I do not know.", "The final answer is wrong; the correct answer is 15."),
])
def test_feedback_names_first_wrong_step(wrong, expected):
    assert offline_teacher.diagnose(wrong, GOLD, tasks.get_task("wordmath"), "15") == expected


def test_parse_equations_handles_gsm_style():
    found = offline_teacher.parse_equations("It costs $1,200 x 3 = $3,600, then 2 + 3 * 4 = 14 and 7 / 2 = 3.5.")
    assert [(e.lhs, e.claimed, e.value) for e in found] == [
        ("$1200 x 3", 3600.0, 3600.0), ("2 + 3 * 4", 14.0, 14.0), ("7 / 2", 3.5, 3.5)]


def test_offline_annotate_is_deterministic_with_distinct_variants(tmp_path):
    data_dir = make_data_dir(tmp_path, n=10)
    argv = ["--backend", "offline", "--num_samples", "3", "--offline_error_rate", "0"]
    collect(teacher_argv(data_dir, tmp_path / "a", *argv))
    collect(teacher_argv(data_dir, tmp_path / "b", *argv))
    a, b = read_data(tmp_path / "a"), read_data(tmp_path / "b")
    assert a == b and len(a) == 10
    gold = {ex.question: ex.gold for ex in tasks.load_split("wordmath", "train", str(data_dir))}
    for question, rationales in a.items():
        assert len(set(rationales)) == 3  # distinct positives for the triplet loss
        for r in rationales:
            assert "\n" not in r and r.endswith(f"Therefore, the answer is {gold[question]}.")


def _checks_out(rationale: str, gold: str) -> bool:
    """Every equation's arithmetic is right and the final answer is the gold."""
    steps = offline_teacher.parse_equations(rationale)
    return (bool(steps) and all(e.checks for e in steps)
            and tasks.extract_answer(tasks.get_task("wordmath"), rationale) == gold)


def _is_slip(rationale: str, gold: str) -> bool:
    """The teacher's slip: earlier steps right, the last step's result and the final answer the same wrong value."""
    steps = offline_teacher.parse_equations(rationale)
    answer = tasks.extract_answer(tasks.get_task("wordmath"), rationale)
    return (answer is not None and answer != gold and all(e.checks for e in steps[:-1])
            and not steps[-1].checks and steps[-1].claimed == float(answer))


def test_slip_is_consistent_but_wrong():
    body = GOLD.replace("so 8 + 7", "and so 8 + 7")
    assert offline_teacher.slip(body, "15", "17") == body.replace("8 + 7 = 15", "8 + 7 = 17")
    assert _is_slip(offline_teacher.slip(body, "15", "17") + " Therefore, the answer is 17.", "15")
    assert offline_teacher.slip("Costs $1,200 x 3 = $3,600.", "3600", "3610") == "Costs $1,200 x 3 = $3610."
    assert offline_teacher.slip("No equations here.", "15", "17") == "No equations here."
    assert offline_teacher.slip("4 + 8 = 12, and then 3 more.", "15", "17") == "4 + 8 = 12, and then 3 more."


def test_offline_error_rate_feeds_the_filter(tmp_path, capsys):
    """Slips are consistent, so only the gold-answer filter catches them: it drops them all and keeps the rest."""
    data_dir = make_data_dir(tmp_path, n=20)
    summary = collect(teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--num_samples", "4",
                                   "--offline_error_rate", "0.3"))
    rejected = summary["samples"]["rejected_by_reason"]
    assert rejected.get("wrong_answer", 0) > 0
    assert summary["samples"]["kept"] + summary["samples"]["rejected"] == 80
    rows = [json.loads(line) for line in (tmp_path / "o" / "teacher_provenance.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rows} <= {"kept", "wrong_answer", "duplicate"}
    assert all(r["template_hash"] and r["request_key"] and r["backend"] == "offline" for r in rows)
    gold = {ex.question: ex.gold for ex in tasks.load_split("wordmath", "train", str(data_dir))}
    for r in rows:
        if r["reason"] == "wrong_answer":
            assert _is_slip(r["rationale"], gold[r["question"]]), r["rationale"]
        else:
            assert _checks_out(r["rationale"], gold[r["question"]]), r["rationale"]
    assert all(_checks_out(t, gold[q]) for q, texts in read_data(tmp_path / "o").items() for t in texts)
    assert "kept" in capsys.readouterr().out


def test_offline_error_rate_default_is_about_what_is_set(tmp_path):
    data_dir = make_data_dir(tmp_path, n=100)
    summary = collect(teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--num_samples", "4"))
    assert args_mod.TeacherArguments.__dataclass_fields__["offline_error_rate"].default == 0.1
    assert summary["samples"]["kept"] + summary["samples"]["rejected"] == 400
    assert 0.06 <= summary["samples"]["rejected_by_reason"].get("wrong_answer", 0) / 400 <= 0.14


def test_offline_slips_in_feedback_mode_too(tmp_path):
    data_dir = make_data_dir(tmp_path, n=6)
    rows = wordmath.generate(6, seed=3)
    wrong = {row["question"]: [student_attempt(row, 1, "arith", random.Random(i))] for i, row in enumerate(rows)}
    (tmp_path / "w.json").write_text(json.dumps(wrong))
    collect(teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--mode", "feedback", "--num_samples", "4",
                         "--student_wrong", str(tmp_path / "w.json"), "--offline_error_rate", "1"))
    records = [json.loads(line) for line in (tmp_path / "o" / "teacher_provenance.jsonl").read_text().splitlines()]
    gold = {row["question"]: row["answer"].rpartition("#### ")[2] for row in rows}
    assert len(records) == 24 and read_data(tmp_path / "o") == {}
    assert all(r["reason"] == "wrong_answer" and _is_slip(r["rationale"], gold[r["question"]]) for r in records)


def test_old_offline_journals_are_not_reused(tmp_path, monkeypatch):
    """The offline teacher's behaviour is in its params, so a journal of the earlier behaviour answers nothing."""
    data_dir = make_data_dir(tmp_path, n=5)
    argv = teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--offline_error_rate", "0")
    with monkeypatch.context() as m:  # the params of the behaviour before tailored solutions
        m.setattr(offline_teacher.OfflineTeacher, "params",
                  lambda self: {"n": self._n, "error_rate": self._error_rate, "seed": self._seed})
        assert collect(argv)["requests"]["from_journal"] == 0
        assert collect(argv)["requests"]["from_journal"] == 5
    assert collect(argv)["requests"]["from_journal"] == 0


# ---- tailored feedback: the student's steps that check out, then the gold from the corrected step on

def student_attempt(row: dict, wrong_at: int, how: str, rng: random.Random, opening: str = "First there are") -> str:
    """A student's attempt at a wordmath row in its own words: step `wrong_at` broken ("arith": its result
    is off; "op": another operation, right arithmetic), later steps carried on from the wrong value."""
    value = row["steps"][0][0]
    parts = [f"{opening} {value}."]
    for i, (_, op, n, _) in enumerate(row["steps"]):
        right = {"+": value + n, "-": value - n, "*": value * n}[op]
        result = right
        if i == wrong_at and how == "op":
            op = {"+": "-", "-": "+", "*": "+"}[op]
            result = {"+": value + n, "-": value - n}[op]
        if i == wrong_at and result == right:
            result = right + rng.choice([-2, -1, 1, 2])
        parts.append(f"Then {value} {op} {n} = {result}.")
        value = result
    return " ".join(parts + [f"Therefore, the answer is {value}."])


def test_tailored_solution_keeps_the_correct_prefix():
    wrong = ("Zoe has 4 stamps. She gets 8 more, which gives 4 + 8 = 12. She gives 4 away; hence 12 - 4 = 9. "
             "She gets 7 more, so 9 + 7 = 16. Therefore, the answer is 16.")
    solution = offline_teacher.tailored_solution(wrong, GOLD, "15", random.Random(0), connector=", so ")
    assert solution.startswith("Zoe has 4 stamps. She gets 8 more, which gives 4 + 8 = 12. "  # the student's
                               "She gives away 4, so 12 - 4 = 8. ")  # the gold's, from the corrected step on
    assert solution.endswith(" 8 + 7 = 15. Therefore, the answer is 15.") and "9" not in solution
    # first step wrong: nothing of the student's is kept, the gold re-worded is the solution
    wrong = ("Zoe has 4 stamps. She gets 8 more, which gives 4 + 8 = 13. 13 - 4 = 9. 9 + 7 = 16. "
             "Therefore, the answer is 16.")
    solution = offline_teacher.tailored_solution(wrong, GOLD, "15", random.Random(0), connector=", so ")
    assert solution.startswith("Zoe starts with 4 stamps. She gets 8 more, so 4 + 8 = 12. She gives away 4")
    assert "Zoe has" not in solution and "13" not in solution and solution.endswith(" Therefore, the answer is 15.")


@pytest.mark.parametrize("wrong", [
    "Zoe has 4 stamps. So 4 + 8 = 12 and then 12 - 4 = 9. 9 + 7 = 16. Therefore, the answer is 16.",  # one sentence
    "Zoe has 4 stamps. Therefore, the answer is 4 + 8 = 12. 12 - 4 = 9. 9 + 7 = 16.",  # a final sentence in it
])
def test_tailored_solution_backs_off_where_the_kept_part_would_hold_a_wrong_step(wrong):
    solution = offline_teacher.tailored_solution(wrong, GOLD, "15", random.Random(0))
    assert solution.startswith("Zoe starts with 4 stamps.") and _checks_out(solution, "15")


def test_tailored_solution_over_many_broken_attempts():
    task = tasks.get_task("wordmath")
    kept_some = 0
    for i in range(50):
        rng = random.Random(i)
        row = wordmath.make_problem(rng, wordmath.Difficulty())
        gold_rationale, gold = row["answer"].split("\n#### ")
        wrong_at = rng.randrange(len(row["steps"]))
        attempt = student_attempt(row, wrong_at, rng.choice(["arith", "op"]), rng)
        assert tasks.extract_answer(task, attempt) != gold
        solution = offline_teacher.tailored_solution(attempt, gold_rationale, gold, rng)
        assert teacher_collect.judge(task, solution, gold) == (solution, "kept")
        steps = offline_teacher.parse_equations(solution)
        assert all(e.checks for e in steps) and [e.claimed for e in steps] == [s[3] for s in row["steps"]]
        student_steps = attempt.split(". ")
        if wrong_at == 0:
            assert "First there are" not in solution
        else:
            kept_some += 1
            assert solution.startswith(". ".join(student_steps[:wrong_at + 1]) + ". ")
            assert student_steps[wrong_at + 1] not in solution
    assert kept_some >= 20


def test_tailored_solution_on_gsm_style_rationales():
    gold = ("Olivia hides 7 x 12 = 84 eggs. Isabella finds 14 eggs. Ava finds 14 x 2 = 28.0 eggs. Noah finds 28.0 - 4 "
            "= 24.0 eggs. The children find a total of 14 + 28.0 + 24.0 = 66.0 eggs. The total number of hidden eggs "
            "still in the yard is 84 - 66.0 = 18.0 eggs.")
    wrong = ("Olivia hid 7 dozen, which is 7 x 12 = 84 eggs. Ava found twice Isabella's 14, so 14 x 2 = 28 eggs. "
             "Noah found 28 + 4 = 32 eggs. Together 14 + 28 + 32 = 74 eggs, so 84 - 74 = 10 are left.")
    solution = offline_teacher.tailored_solution(wrong, gold, "18", random.Random(0))
    assert solution == ("Olivia hid 7 dozen, which is 7 x 12 = 84 eggs. Ava found twice Isabella's 14, so 14 x 2 = 28 "
                        "eggs. Noah finds 28.0 - 4 = 24.0 eggs. The children find a total of 14 + 28.0 + 24.0 = 66.0 "
                        "eggs. The total number of hidden eggs still in the yard is 84 - 66.0 = 18.0 eggs. "
                        "Therefore, the answer is 18.")
    # folded GSM lines without full stops: the sentence ends before the next capitalised word
    gold = "She pays $1,200 x 3 = $3,600 in rent Then she adds 3,600 + 400 = $4,000 Her total is $4,000"
    wrong = "Rent is $1,200 x 3 = $3,600 for her Then 3,600 + 400 = $4,100 Therefore, the answer is 4,100."
    assert offline_teacher.tailored_solution(wrong, gold, "4000", random.Random(0)) == (
        "Rent is $1,200 x 3 = $3,600 for her. Then she adds 3,600 + 400 = $4,000 Her total is $4,000 "
        "Therefore, the answer is 4000.")


def test_tailored_feedback_depends_on_the_attempt(tmp_path):
    """Two attempts at one question get different training texts, each keeping that student's right steps."""
    data_dir = make_data_dir(tmp_path, n=4)
    row = wordmath.generate(4, seed=3)[2]
    attempts = [student_attempt(row, 1, "arith", random.Random(0)),
                student_attempt(row, 1, "arith", random.Random(0), opening="We begin with"),
                student_attempt(row, 0, "op", random.Random(0))]
    (tmp_path / "w.json").write_text(json.dumps({row["question"]: attempts}))
    collect(teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--mode", "feedback", "--num_samples", "2",
                         "--student_wrong", str(tmp_path / "w.json"), "--max_wrong_per_question", "3",
                         "--offline_error_rate", "0"))
    records = [json.loads(line) for line in (tmp_path / "o" / "teacher_provenance.jsonl").read_text().splitlines()]
    texts = {a: {r["rationale"] for r in records if r["student_rationale"] == a} for a in attempts}
    assert all(texts.values()) and all(r["reason"] == "kept" for r in records)
    assert not (texts[attempts[0]] & texts[attempts[1]] or texts[attempts[0]] & texts[attempts[2]]
                or texts[attempts[1]] & texts[attempts[2]])
    for attempt in attempts[:2]:
        kept = ". ".join(attempt.split(". ")[:2]) + ". "
        assert all(t.startswith(kept) for t in texts[attempt])
    gold_steps = [float(s[3]) for s in row["steps"]]
    for t in texts[attempts[2]]:  # first step wrong: the gold re-worded
        assert "First there are" not in t and [e.claimed for e in offline_teacher.parse_equations(t)] == gold_steps


def test_offline_feedback_mode(tmp_path):
    data_dir = make_data_dir(tmp_path, n=4)
    examples = tasks.load_split("wordmath", "train", str(data_dir))
    ex = examples[1]
    first = offline_teacher.parse_equations(ex.rationale)[0]
    wrong = f"{first.lhs} = {int(first.claimed) + 1}. Therefore, the answer is {int(first.claimed) + 1}."
    student_wrong = tmp_path / "student_wrong.json"
    student_wrong.write_text(json.dumps({ex.question: [wrong, wrong + " ", "Therefore, the answer is 0."]}))
    out = tmp_path / "fb"
    summary = collect(teacher_argv(data_dir, out, "--backend", "offline", "--mode", "feedback",
                                   "--student_wrong", str(student_wrong), "--offline_error_rate", "0",
                                   "--max_wrong_per_question", "1"))
    assert summary["requests"]["total"] == 1  # duplicates folded, then capped at 1 per question
    data = read_data(out)
    assert list(data) == [ex.question]
    # the critique names the student's wrong step; only the solution after it is training data
    critique = f"The step {wrong.split('.')[0]} is wrong: {first.lhs} = {int(first.claimed)}."
    for r in data[ex.question]:
        assert "wrong" not in r and "Correct solution" not in r
        assert r.endswith(f"Therefore, the answer is {ex.gold}.")
    records = [json.loads(line) for line in (out / "teacher_provenance.jsonl").read_text().splitlines()]
    assert records and all(rec["critique"] == critique and rec["rationale"] in data[ex.question] for rec in records)


def test_offline_needs_gold_rationales(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "sqa").mkdir(parents=True)
    (data_dir / "sqa" / "train.jsonl").write_text(json.dumps({"question": "Is ice cold?", "answer": True}) + "\n")
    with pytest.raises(UserError, match="gold rationale"):
        collect(["--task", "sqa", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o"),
                 "--backend", "offline"])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- filter and journal

@pytest.mark.parametrize("task, text, gold, expected", [
    ("wordmath", "", "5", (None, "empty")),
    ("wordmath", "2 + 3 = 5.\nTherefore, the answer is 5.\n\nAnswer: 5", "5",
     ("2 + 3 = 5. Therefore, the answer is 5.", "kept")),
    ("wordmath", "So it is 5.", "5", ("So it is 5.", "no_final_sentence")),
    ("wordmath", "Therefore, the answer is 6.", "5", ("Therefore, the answer is 6.", "wrong_answer")),
    ("wordmath", "3 + 2 = 5. Therefore, the answer is 5", "5", ("3 + 2 = 5. Therefore, the answer is 5.", "kept")),
    ("wordmath", "Therefore, the answer is unclear.", "5", ("Therefore, the answer is unclear.", "no_answer")),
    ("wordmath", "Half is 2.5. Therefore, the answer is 2.5. Done.", "2.5",
     ("Half is 2.5. Therefore, the answer is 2.5.", "kept")),
    ("cqa", "Ice is cold. Therefore, the answer is ice cream (b).", "b",
     ("Ice is cold. Therefore, the answer is ice cream (b).", "kept")),
    ("sqa", "Ice melts. Therefore, the answer is no.", "No", ("Ice melts. Therefore, the answer is no.", "kept")),
])
def test_judge(task, text, gold, expected):
    assert teacher_collect.judge(tasks.get_task(task), text, gold) == expected


@pytest.mark.parametrize("text, expected", [
    ("The step 2 + 2 = 5 is wrong: 2 + 2 = 4. Correct solution: 2 + 2 = 4. Therefore, the answer is 4.",
     ("2 + 2 = 4. Therefore, the answer is 4.", "kept")),
    ("Wrong first step. correct solution : 2 + 2 = 4. Therefore, the answer is 4.",
     ("2 + 2 = 4. Therefore, the answer is 4.", "kept")),
    ("The step 2 + 2 = 5 is wrong. 2 + 2 = 4. Therefore, the answer is 4.", (None, "no_solution_marker")),
    ("The step is wrong. Correct solution:", (None, "no_solution_marker")),
    ("Off by one. Correct solution: 2 + 3 = 5. Therefore, the answer is 5.", ("2 + 3 = 5. Therefore, the answer is 5.",
                                                                             "wrong_answer")),
])
def test_judge_keeps_only_the_solution_of_a_feedback_reply(text, expected):
    assert teacher_collect.judge(tasks.get_task("wordmath"), text, "4", "feedback") == expected


def test_journal_ignores_and_repairs_truncated_tail(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"key": "a", "texts": ["x"]}\n{"key": "b", "texts": ["x"]}\n{"key": "c", "tex')
    journal = teacher_journal.Journal(path)
    assert set(journal.load()) == {"a", "b"}
    journal.append({"key": "d", "texts": ["x"]})
    journal.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "d"]


def test_retry_delay_honours_retry_after():
    policy, rng = teacher_collect.RetryPolicy(max_retries=3, base_delay=0.1), random.Random(0)
    assert 2.0 <= policy.delay(0, 2.0, rng) <= 2.4
    assert all(0.05 * 2 ** a <= policy.delay(a, None, rng) <= 0.1 * 2 ** a for a in range(4))


# ---------------------------------------------------------------- openai backend against the fake server

def test_faults_are_retried_and_key_is_sent_but_never_written(tmp_path, server, with_key, capfd):
    data_dir = make_data_dir(tmp_path, n=6)
    server.inject("429", "500", "malformed", "slow", "500")
    server.slow_s = 1.5
    out = tmp_path / "o"
    summary = collect(openai_argv(server, data_dir, out, "--concurrency", "2", "--request_timeout", "0.5"))
    assert summary["requests"] == {"total": 6, "from_journal": 0, "new": 6, "failed": 0, "not_run": 0}
    assert summary["samples"]["kept"] == 12 and summary["samples"]["questions_with_data"] == 6
    assert server.attempts == 6 + 5 and server.completed >= 6
    assert server.auth_headers and all(h == f"Bearer {SECRET}" for h in server.auth_headers)
    records = journal_lines(out)
    assert len(records) == 6 and all(r["usage"]["prompt_tokens"] > 0 for r in records)
    assert sum(r["attempts"] for r in records) == 11
    assert summary["cost_usd"]["this_run"] > 0  # gpt-3.5-turbo has a built-in price
    captured = capfd.readouterr()
    assert "retry" in captured.err
    assert_no_secret(out, captured.out, captured.err)


def test_rate_limit_waits_for_retry_after(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=1)
    server.retry_after = 0.4
    server.inject("429")
    started = time.time()
    summary = collect(openai_argv(server, data_dir, tmp_path / "o"))
    assert time.time() - started >= 0.4 and summary["samples"]["kept"] == 2


def test_rerun_makes_no_requests(tmp_path, server, with_key, capsys):
    data_dir = make_data_dir(tmp_path, n=5)
    out = tmp_path / "o"
    collect(openai_argv(server, data_dir, out))
    first = read_data(out)
    server.reset_counts()
    summary = collect(openai_argv(server, data_dir, out))
    assert server.attempts == 0 and summary["requests"]["new"] == 0 and summary["requests"]["from_journal"] == 5
    assert read_data(out) == first and len(journal_lines(out)) == 5
    tokens = json.loads((out / "summary.json").read_text())["tokens"]
    assert tokens["prompt_tokens"] > 0 and tokens["completion_tokens"] > 0
    # A different template/params is a different request: n=3 asks again.
    collect(openai_argv(server, data_dir, out, "--num_samples", "3"))
    assert server.attempts == 5


def test_cqa_and_sqa_formats(tmp_path, server, with_key):
    data_dir = tmp_path / "data"
    (data_dir / "cqa").mkdir(parents=True)
    (data_dir / "sqa").mkdir(parents=True)
    choices = {"label": list("ABCDE"), "text": ["bed", "ice cream", "car", "tree", "lake"]}
    (data_dir / "cqa" / "train.jsonl").write_text(
        json.dumps({"question": "What is cold and sweet?", "choices": choices, "answerKey": "B"}) + "\n")
    (data_dir / "sqa" / "train.jsonl").write_text(json.dumps({"question": "Is fire cold?", "answer": False}) + "\n")
    for task, ending in [("cqa", "Therefore, the answer is ice cream (b)."), ("sqa", "Therefore, the answer is no.")]:
        out = tmp_path / task
        collect(["--task", task, "--data_dir", str(data_dir), "--output_dir", str(out), "--base_url", server.url])
        data = read_data(out)
        assert len(data) == 1 and all(r.endswith(ending) for r in next(iter(data.values())))


def test_max_requests_stops_cleanly_and_resumes(tmp_path, server, with_key, capsys):
    data_dir = make_data_dir(tmp_path, n=8)
    out = tmp_path / "o"
    summary = collect(openai_argv(server, data_dir, out, "--max_requests", "3", "--concurrency", "2"))
    assert summary["stopped_early"] and "--max_requests 3" in summary["stop_reason"]
    assert summary["requests"]["new"] == 3 and summary["requests"]["not_run"] == 5
    assert len(read_data(out)) == 3 and json.loads((out / "summary.json").read_text())["stopped_early"]
    assert "STOPPED EARLY" in capsys.readouterr().err
    server.reset_counts()
    summary = collect(openai_argv(server, data_dir, out))
    assert server.completed == 5 and not summary["stopped_early"] and len(read_data(out)) == 8


def test_max_cost_stops_before_passing_the_budget(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=8)
    # 1000 USD per 1M tokens: a request (~120 prompt + 2 x 150 completion tokens) costs about 0.4
    summary = collect(openai_argv(server, data_dir, tmp_path / "o", "--prompt_price_per_1m", "1000",
                                  "--completion_price_per_1m", "1000", "--max_cost", "1.0", "--concurrency", "1"))
    assert summary["stopped_early"] and "--max_cost" in summary["stop_reason"]
    assert 0 < summary["requests"]["new"] < 8 and summary["cost_usd"]["this_run"] <= 1.0


def test_dry_run_sends_and_writes_nothing(tmp_path, server, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data_dir = make_data_dir(tmp_path, n=5)
    out = tmp_path / "o"
    summary = collect(teacher_argv(data_dir, out, "--dry_run"))  # the real OpenAI URL: no key needed to estimate
    assert summary["dry_run"]["new_requests"] == 5 and summary["dry_run"]["est_cost_usd"] > 0
    assert server.attempts == 0 and not out.exists()
    assert "no request was made" in capsys.readouterr().out


def test_empty_replies_are_retried_and_never_journaled(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=3)
    empty_question = tasks.load_split("wordmath", "train", str(data_dir))[0].question
    server.always[empty_question] = "empty"
    with pytest.raises(teacher.CollectionFailed, match="1 of 3 requests failed .*empty reply") as failed:
        collect(openai_argv(server, data_dir, tmp_path / "o", "--max_retries", "2"))
    assert failed.value.summary["requests"]["failed"] == 1 and server.attempts == 3 + 2
    assert empty_question not in read_data(tmp_path / "o") and len(read_data(tmp_path / "o")) == 2
    assert all(r["question"] != empty_question for r in journal_lines(tmp_path / "o"))


def test_exhausted_retries_and_bad_requests_fail_alone_then_rerun_fills_in(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=4)
    questions = [ex.question for ex in tasks.load_split("wordmath", "train", str(data_dir))]
    server.always = {questions[0]: "500", questions[1]: "400"}
    out = tmp_path / "o"
    with pytest.raises(teacher.CollectionFailed, match="2 of 4 requests failed") as failed:
        collect(openai_argv(server, data_dir, out, "--max_retries", "2", "--concurrency", "1"))
    summary = failed.value.summary
    assert summary["requests"]["failed"] == 2 and summary["requests"]["new"] == 2
    assert stages.teacher_result(out) is None  # the round driver runs such a stage again
    assert server.attempts == 3 + 1 + 2  # 500 retried twice, 400 not retried
    assert sorted(read_data(out)) == sorted(questions[2:])
    reasons = [json.loads(line)["reason"] for line in (out / "teacher_provenance.jsonl").read_text().splitlines()]
    assert sum(r.startswith("request_failed") for r in reasons) == 2
    server.always = {}
    summary = collect(openai_argv(server, data_dir, out))
    assert summary["requests"]["new"] == 2 and len(read_data(out)) == 4 and stages.teacher_result(out)


def test_concurrency_is_bounded(tmp_path, with_key):
    data_dir = make_data_dir(tmp_path, n=12)
    with FakeOpenAIServer(latency=0.05) as slow:
        collect(openai_argv(slow, data_dir, tmp_path / "o", "--concurrency", "4"))
        assert slow.max_in_flight == 4


def test_prices(tmp_path):
    table_file = tmp_path / "prices.json"
    table_file.write_text(json.dumps({"my-model": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}}))
    table = teacher_journal.load_price_table(str(table_file))
    assert teacher_journal.resolve_prices("my-model", table, None, None).cost(1_000_000, 1_000_000) == 3.0
    assert teacher_journal.resolve_prices("gpt-4o-mini-2024-07-18", table, None, None).prompt_per_1m == 0.15
    assert teacher_journal.resolve_prices("gpt-4o", table, 9.0, None) == teacher_journal.Prices(9.0, 10.0)
    assert not teacher_journal.resolve_prices("mystery", table, None, None).known
    table_file.write_text(json.dumps({"bad": {"prompt_per_1m": "x"}}))
    with pytest.raises(UserError, match="bad"):
        teacher_journal.load_price_table(str(table_file))


def test_max_cost_needs_a_known_price(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=2)
    with pytest.raises(UserError, match="no price known"):
        collect(openai_argv(server, data_dir, tmp_path / "o", "--teacher_model", "mystery", "--max_cost", "1"))
    assert server.attempts == 0 and not (tmp_path / "o").exists()


def test_bad_key_stops_without_output(tmp_path, server, with_key):
    data_dir = make_data_dir(tmp_path, n=3)
    server.always["Question:"] = "401"
    with pytest.raises(UserError, match="401"):
        collect(openai_argv(server, data_dir, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_missing_key_for_a_real_server_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data_dir = make_data_dir(tmp_path, n=2)
    with pytest.raises(UserError, match="OPENAI_API_KEY is not set"):
        collect(teacher_argv(data_dir, tmp_path / "o", "--base_url", "https://api.example.com/v1"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the CLI on bad input

def run_cli(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["query_teacher.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        query_teacher.main()
    return exit_info.value.code


def test_cli_missing_student_wrong_file(tmp_path, monkeypatch, capsys):
    data_dir = make_data_dir(tmp_path, n=2)
    code = run_cli(monkeypatch, teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--mode", "feedback",
                                             "--student_wrong", str(tmp_path / "nope.json")))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "nope.json" in err
    assert not (tmp_path / "o").exists()


def test_cli_question_not_in_split(tmp_path, monkeypatch, capsys):
    data_dir = make_data_dir(tmp_path, n=2)
    known = tasks.load_split("wordmath", "train", str(data_dir))[0].question
    student_wrong = tmp_path / "sw.json"
    student_wrong.write_text(json.dumps({known: ["Therefore, the answer is 0."], "Who am I?": ["x"]}))
    argv = teacher_argv(data_dir, tmp_path / "o", "--backend", "offline", "--mode", "feedback",
                        "--student_wrong", str(student_wrong))
    assert run_cli(monkeypatch, argv) == 2
    assert "'Who am I?'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    summary = collect(argv + ["--skip_unknown_questions"])
    assert summary["unknown_questions_skipped"] == 1 and list(read_data(tmp_path / "o")) == [known]


def test_cli_bad_flag_value(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, ["--concurrency", "0", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--concurrency" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- template hashes: one per task kind

def _request_keys() -> dict[str, str]:
    """The journal key of one annotate and one feedback request for a task of every kind there is today."""
    from teacher_templates import render

    keys = {}
    for name in ("wordmath", "cqa", "sqa"):
        task = tasks.get_task(name)
        ex = tasks.Example(question="Q?", gold="a" if task.kind == "choice" else "3", rationale="R.",
                           choices=["x", "y", "z", "w", "v"] if task.kind == "choice" else None)
        for kind in ("annotate", "feedback"):
            keys[f"{name}/{kind}"] = teacher_journal.request_key("offline", "m", render(kind, task, ex, "wrong"), {"n": 2})
    return keys


def test_template_hashes_of_existing_kinds_are_those_journals_were_keyed_with():
    """The hashes in journals written before each kind got its own: a change here re-asks a paid teacher."""
    from teacher_templates import template_hash

    for task_kind in ("math", "yesno", "choice"):
        assert (template_hash("annotate", task_kind), template_hash("feedback", task_kind)) == ("20cff6721e01", "e7b5f35c7cd2")


def test_adding_a_task_kind_leaves_existing_request_keys_unchanged(monkeypatch):
    import dataclasses

    import answers
    from teacher_templates import template_hash

    before = _request_keys()
    date_kind = dataclasses.replace(answers.KINDS["math"], name="date", teacher_shape='"The answer is <YYYY-MM-DD>."')
    monkeypatch.setitem(answers.KINDS, "date", date_kind)
    assert _request_keys() == before
    # the new kind hashes its own final sentence: editing it later moves its keys alone
    assert template_hash("annotate", "date") not in {template_hash("annotate", k) for k in ("math", "yesno", "choice")}
    edited = dataclasses.replace(date_kind, teacher_shape='"The answer is <DD.MM.YYYY>."')
    hash_before_edit = template_hash("annotate", "date")
    monkeypatch.setitem(answers.KINDS, "date", edited)
    assert template_hash("annotate", "date") != hash_before_edit
    assert _request_keys() == before
