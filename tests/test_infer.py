"""infer.py and infer_student_wrong.py end to end on the tiny embedded student; bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_script, write_jsonl


def only_file(folder: Path, pattern: str) -> Path:
    files = list(folder.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_infer_end_to_end_writes_graded_records(tiny_student, data_dir, tmp_path):
    out = tmp_path / "eval"
    result = run_script("infer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--test_on", "test",
                        "--checkpoint", str(tiny_student), "--rationale", "--batch", "16", "--output_dir", str(out),
                        "--note", "smoke")
    assert result.returncode == 0, result.stderr
    acc_file = only_file(out, "Acc*.json")
    data = json.loads(acc_file.read_text())
    assert data["total"] == 48 and len(data["results"]) == 48
    assert acc_file.name == f"Acc{data['acc']:.4f}.json"  # acc in percent, as the original
    assert data["correct"] == sum(r["correct"] for r in data["results"])
    assert data["accuracy"] == pytest.approx(data["correct"] / 48) and data["acc"] == pytest.approx(100 * data["accuracy"])
    assert data["strict_correct"] == sum(r["strict_correct"] for r in data["results"])
    assert data["args"]["note"] == "smoke" and data["args"]["rationale"] is True
    questions = [json.loads(line)["question"] for line in (data_dir / "wordmath" / "test.jsonl").read_text().splitlines()]
    assert [r["question"] for r in data["results"]] == questions  # input order, no item lost or repeated
    for record in data["results"]:
        assert "\n\n" not in record["raw_generated"]  # cut at the blank line
        assert record["raw_generated"].strip().startswith(record["generated"])
        assert set(record) >= {"question", "answer", "final_ans", "generated", "pred", "correct", "strict_correct"}
    # the warm-started student writes rationales that end in an answer line
    assert sum("\nAnswer:" in r["generated"] for r in data["results"]) >= 24
    assert "accuracy" in result.stdout and str(acc_file) in result.stdout


def test_two_process_cpu_evaluation_equals_one_process(tiny_student, data_dir, tmp_path):
    common = ["infer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--checkpoint", str(tiny_student),
              "--rationale", "--batch", "8"]
    one = run_script(*common, "--output_dir", str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = run_script(*common, "--device", "0,1", "--output_dir", str(tmp_path / "two"))  # torchrun, 2 CPU ranks
    assert two.returncode == 0, two.stderr
    a = json.loads(only_file(tmp_path / "one", "Acc*.json").read_text())
    b = json.loads(only_file(tmp_path / "two", "Acc*.json").read_text())
    assert a["results"] == b["results"]
    assert (a["correct"], a["total"]) == (b["correct"], b["total"])


def test_exam_writes_wrong_rationales_samples_and_summary(tiny_student, data_dir, tmp_path):
    out = tmp_path / "exam"
    result = run_script("infer_student_wrong.py", "--task", "wordmath", "--data_dir", str(data_dir), "--rationale",
                        "--test_on", "train", "--limit", "40", "--num_return_sequences", "3", "--batch", "8",
                        "--checkpoint", str(tiny_student), "--output_dir", str(out), "--note", "round1")
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    wrong = json.loads((out / "student_wrong.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(samples) == 120 and summary["questions"] == 40
    expected = {}
    for s in samples:
        if not s["correct"] and s["cleaned"]:
            bucket = expected.setdefault(s["question"], [])
            if s["cleaned"] not in bucket:
                bucket.append(s["cleaned"])
    assert wrong == expected and wrong  # de-duplicated wrong rationales per question, right ones absent
    always_right = {q for q in {s["question"] for s in samples}
                    if all(x["correct"] for x in samples if x["question"] == q)}
    assert not always_right & set(wrong)
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 120)
    assert 0 <= summary["accuracy"] <= summary["pass@3"] <= 1


@pytest.mark.parametrize("case", ["unknown_task", "missing_column", "empty_split", "missing_checkpoint",
                                  "malformed_file", "bad_device"])
def test_bad_inputs_give_one_line_and_write_nothing(case, tiny_student, tmp_path):
    data = tmp_path / "data"
    argv = {"task": "wordmath", "checkpoint": str(tiny_student), "device": "cpu"}
    if case == "unknown_task":
        argv["task"] = "gsm9k"
    elif case == "missing_column":
        write_jsonl(data / "wordmath" / "test.jsonl", [{"question": "q", "solution": "1"}])
    elif case == "empty_split":
        (data / "wordmath").mkdir(parents=True)
        (data / "wordmath" / "test.jsonl").write_text("")
    elif case == "missing_checkpoint":
        argv["checkpoint"] = str(tmp_path / "no_such_ckpt")
    elif case == "malformed_file":
        (data / "wordmath").mkdir(parents=True)
        (data / "wordmath" / "test.jsonl").write_text('{"question": "q", "answer": "1\n#### 1"}\n{oops\n')
    elif case == "bad_device":
        argv["device"] = "gpu0"
    if case in ("missing_checkpoint", "unknown_task", "bad_device"):
        write_jsonl(data / "wordmath" / "test.jsonl", [{"question": "q", "answer": "1\n#### 1"}])
    out = tmp_path / "out"
    result = run_script("infer.py", "--data_dir", str(data), "--rationale", "--output_dir", str(out),
                        *[x for k, v in argv.items() for x in (f"--{k}", v)])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()


def test_two_process_exam_samples_equal_one_process(tiny_student, data_dir, tmp_path):
    common = ["infer_student_wrong.py", "--task", "wordmath", "--data_dir", str(data_dir), "--rationale",
              "--checkpoint", str(tiny_student), "--limit", "24", "--num_return_sequences", "2", "--batch", "4",
              "--max_new_tokens", "48", "--fewshot", "yes"]  # few-shot: each rank continues from the demos' cache
    one = run_script(*common, "--output_dir", str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    two = run_script(*common, "--device", "0,1", "--output_dir", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    for name in ("samples.jsonl", "student_wrong.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
