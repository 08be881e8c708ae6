"""--engine vllm against --engine hf: evaluation and the exam end to end on the same student and prompts.

vLLM lives in its own environment (`bash scripts/env.sh --vllm` -> .venv-vllm, which scripts/test.sh builds and
names in LTR_VLLM_PYTHON). Without it the vLLM runs skip, except where LTR_REQUIRE_VLLM=1 (CI) makes that a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, build_tiny_student, run_script
from generation import self_consistency, vote
from tasks import Example, get_task

VLLM_PYTHON = Path(os.environ.get("LTR_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def vllm_python() -> str:
    if VLLM_PYTHON.is_file():
        return str(VLLM_PYTHON)
    if os.environ.get("LTR_REQUIRE_VLLM") == "1":
        pytest.fail(f"LTR_REQUIRE_VLLM=1 but {VLLM_PYTHON} does not exist (bash scripts/env.sh --vllm builds it)")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (bash scripts/env.sh --vllm builds it)")


def run_vllm(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([vllm_python(), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def acc_file(folder: Path) -> dict:
    (path,) = folder.glob("Acc*.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- self-consistency (pure)

def test_vote_takes_the_most_frequent_answer_and_ignores_samples_without_one():
    task = get_task("wordmath")
    texts = ["So 3.\nAnswer: 7", "So 2.\nAnswer: 5", "nothing here", "So 3.\nAnswer: 7", "So 1.\nAnswer: 5"]
    result = vote(task, texts, "5", rationale=True)
    assert result["predictions"][2] is None
    assert result["majority"] == "7"  # 7 and 5 tie at two votes: the first seen wins
    assert result["majority_correct"] is False and result["any_correct"] is True
    assert vote(task, ["no answer", "none"], "5", rationale=True) == {
        "predictions": [None, None], "majority": None, "majority_correct": False, "any_correct": False}


def test_self_consistency_reports_maj_and_pass_at_k():
    task = get_task("wordmath")
    examples = [Example("q1", "4"), Example("q2", "9"), Example("q3", "1")]
    outputs = [["Answer: 4", "Answer: 4", "Answer: 2"],   # majority right
               ["Answer: 3", "Answer: 3", "Answer: 9"],   # only pass
               ["Answer: 6", "Answer: 6", "Answer: 6"]]   # neither
    summary = self_consistency(task, examples, outputs, rationale=True)
    assert summary["k"] == 3 and summary["maj@3"] == pytest.approx(1 / 3) and summary["pass@3"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- without vLLM installed

def test_engine_vllm_without_vllm_is_one_error_line_naming_the_install(tiny_student, data_dir, tmp_path):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here")
    out = tmp_path / "eval"
    result = run_script("infer.py", "--engine", "vllm", "--load", str(tiny_student), "--data_dir", str(data_dir),
                        "--test_on", "validation", "--limit", "2", "--output_dir", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --engine vllm: vLLM cannot be imported") and "bash scripts/env.sh --vllm" in last
    assert not list(out.glob("Acc*.json"))


def test_hf_engine_is_recorded_in_gen_config_beside_the_original_keys(tiny_student, data_dir, tmp_path):
    result = run_script("infer.py", "--load", str(tiny_student), "--data_dir", str(data_dir), "--test_on", "validation",
                        "--limit", "4", "--self_consistency", "2", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    data = acc_file(tmp_path)
    assert data["gen_config"]["engine"] == "hf" and data["gen_config"]["max_new_tokens"] > 0
    sampled = data["self_consistency"]
    assert sampled["k"] == 2 and sampled["gen_config"]["do_sample"] is True and sampled["gen_config"]["num_return_sequences"] == 2
    assert all(len(item["samples"]) == 2 and "majority_correct" in item for item in data["results"])
    assert f"maj@2 {sampled['maj@2']:.4f}, pass@2 {sampled['pass@2']:.4f}" in result.stdout


# ---------------------------------------------------------------- both engines, same prompts

@pytest.fixture(scope="module")
def student32(data_dir, tmp_path_factory) -> Path:
    """The suite's tiny student with 2 heads of 32 (vLLM's CPU attention has no head size 16)."""
    return build_tiny_student(data_dir, tmp_path_factory.mktemp("student32"), n_head=2)


def test_a_head_size_vllm_cannot_serve_on_cpu_is_one_error_line(tiny_student, data_dir, tmp_path):
    result = run_vllm("infer.py", "--engine", "vllm", "--load", str(tiny_student), "--data_dir", str(data_dir),
                      "--test_on", "validation", "--limit", "2", "--output_dir", str(tmp_path / "eval"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --load: ") and "heads of size 16" in last and "--engine hf" in last
    assert not list((tmp_path / "eval").glob("Acc*.json"))

@pytest.fixture(scope="module")
def both_engines(student32, data_dir, tmp_path_factory):
    """Few-shot greedy evaluation with 3 samples per question on top, by each engine."""
    out = tmp_path_factory.mktemp("engines")
    flags = ["infer.py", "--load", str(student32), "--data_dir", str(data_dir), "--test_on", "validation",
             "--fewshot", "--self_consistency", "3", "--max_new_tokens", "48"]
    vllm_run = run_vllm(*flags, "--engine", "vllm", "--output_dir", str(out / "vllm"))
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    hf_run = run_script(*flags, "--output_dir", str(out / "hf"))
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    return acc_file(out / "hf"), acc_file(out / "vllm"), vllm_run


def test_vllm_greedy_outputs_match_hf_on_fewshot_prompts(both_engines):
    hf, vl, _ = both_engines
    assert [r["question"] for r in hf["results"]] == [r["question"] for r in vl["results"]]
    same = sum(a["raw_generated"] == b["raw_generated"] for a, b in zip(hf["results"], vl["results"]))
    assert same / len(hf["results"]) >= 0.97, f"{same} of {len(hf['results'])} greedy outputs agree"
    assert any(r["raw_generated"] for r in vl["results"])
    assert vl["correct"] == sum(r["correct"] for r in vl["results"])


def test_vllm_data_parallel_over_two_processes_gives_the_same_outputs(both_engines, student32, data_dir, tmp_path):
    """--device 0,1 on a CPU machine: two torchrun processes, one vLLM engine each, each on its share."""
    hf, _, _ = both_engines
    result = run_vllm("infer.py", "--engine", "vllm", "--device", "0,1", "--load", str(student32), "--data_dir",
                      str(data_dir), "--test_on", "validation", "--fewshot", "--max_new_tokens", "48",
                      "--output_dir", str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "launching:" in result.stdout and "--nproc_per_node 2" in result.stdout
    parallel = acc_file(tmp_path)
    assert [r["question"] for r in parallel["results"]] == [r["question"] for r in hf["results"]]
    same = sum(a["raw_generated"] == b["raw_generated"] for a, b in zip(hf["results"], parallel["results"]))
    assert same / len(hf["results"]) >= 0.97, f"{same} of {len(hf['results'])} greedy outputs agree"


def test_vllm_acc_file_has_the_same_layout_and_records_the_engine(both_engines):
    hf, vl, run = both_engines
    assert set(hf) == set(vl) and set(hf["results"][0]) == set(vl["results"][0])
    config = vl["gen_config"]
    assert config["engine"] == "vllm" and config["temperature"] == 0.0 and config["stop"] == ["\n\n"]
    assert config["extra_args"]["suppress_first"]  # no special token first, as the HF path's begin_suppress_tokens
    sampled = vl["self_consistency"]
    assert sampled["gen_config"]["n"] == 3 and sampled["gen_config"]["seed"].endswith("the prompt's index")
    assert all(len(item["samples"]) == 3 for item in vl["results"])
    assert 0 <= sampled["maj@3"] <= sampled["pass@3"] <= 1
    assert "maj@3" in run.stdout and "pass@3" in run.stdout


def test_vllm_exam_writes_the_exam_files(student32, data_dir, tmp_path):
    flags = ["infer_student_wrong.py", "--load", str(student32), "--data_dir", str(data_dir), "--limit", "12",
             "--num_return_sequences", "3", "--max_new_tokens", "48"]
    result = run_vllm(*flags, "--engine", "vllm", "--output_dir", str(tmp_path / "vllm"))
    assert result.returncode == 0, result.stderr[-3000:]
    reference = run_script(*flags, "--output_dir", str(tmp_path / "hf"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert set(summary) == set(json.loads((tmp_path / "hf" / "summary.json").read_text()))
    assert summary["gen_config"]["engine"] == "vllm" and summary["gen_config"]["n"] == 3
    samples = [json.loads(line) for line in (tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 36 and {s["sample"] for s in samples} == {0, 1, 2}
    wrong = json.loads((tmp_path / "vllm" / "student_wrong.json").read_text())
    assert summary["questions_with_mistakes"] == len(wrong)
    wrong_questions = {s["question"] for s in samples if not s["correct"] and s["cleaned"]}
    assert set(wrong) == wrong_questions


# ---------------------------------------------------------------- a real OpenAI-compatible server: vllm serve

@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm serve` with SmolLM2-135M-Instruct (a stand-in teacher: it has a chat template), on a free port."""
    import socket
    import time
    import urllib.request

    from pretrained_student import convert

    python = vllm_python()
    model = convert(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    with log.open("w") as sink:
        # `vllm serve` is the same server; the CLI of the vllm-cpu package looks for a package named vllm and stops
        server = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
                                   "--host", "127.0.0.1", "--served-model-name", "smollm2-teacher", "--dtype", "float32",
                                   "--max-model-len", "2048", "--no-enable-chunked-prefill", "--enforce-eager"],
                                  cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
                    if b"smollm2-teacher" in reply.read():
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"vllm serve did not come up: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_teacher_stage_against_a_real_vllm_server(vllm_server, data_dir, tmp_path):
    """The protocol, the journal, cost accounting and retries against a real server, not our fake. Teacher quality
    does not matter: a 135M model rarely gets the answer right, so most samples are rejected by the filter."""
    url, server = vllm_server
    out = tmp_path / "teacher"
    flags = ["query_teacher.py", "--backend", "openai", "--base_url", url, "--teacher_model", "smollm2-teacher",
             "--task", "wordmath", "--data_dir", str(data_dir), "--output_dir", str(out), "--num_samples", "2",
             "--max_tokens", "64", "--prompt_price_per_1m", "1", "--completion_price_per_1m", "2",
             "--request_timeout", "60", "--backoff_base", "0.1", "--max_retries", "2"]
    first = run_script(*flags, "--limit", "3", env={"OPENAI_API_KEY": "local-server-needs-none"})
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == {"total": 3, "from_journal": 0, "new": 3, "failed": 0, "not_run": 0}
    records = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["usage"]["prompt_tokens"] > 0 and r["usage"]["completion_tokens"] > 0
                                      for r in records)
    tokens = sum(r["usage"]["prompt_tokens"] for r in records), sum(r["usage"]["completion_tokens"] for r in records)
    assert summary["cost_usd"]["this_run"] == pytest.approx((tokens[0] * 1 + tokens[1] * 2) / 1e6, rel=1e-3)
    assert summary["samples"]["kept"] + summary["samples"]["rejected"] == 6  # n=2 per request, from the server
    assert "local-server-needs-none" not in (out / "journal.jsonl").read_text() + first.stdout + first.stderr

    # the journal answers what was asked; with the server gone, the new question is retried, then recorded as failed
    server.terminate()
    server.wait(timeout=60)
    second = run_script(*flags, "--limit", "4", env={"OPENAI_API_KEY": "local-server-needs-none"})
    assert second.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"]["from_journal"] == 3 and summary["requests"]["failed"] == 1
    assert len((out / "journal.jsonl").read_text().splitlines()) == 3
