"""Shared fixtures: a small embedded dataset and a tiny warm-started student, built once per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: each worker (and what it starts) gets its share of cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_script(*argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' ops are too small to split: a second OpenMP thread only waits, and on a busy 2-core
    machine that wait made such tests up to 20x slower. Modules opt in with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """localdataset-style folder with a small wordmath task (train 240, validation 40, test 48)."""
    import wordmath

    root = tmp_path_factory.mktemp("data")
    train = wordmath.generate(240, seed=11)
    test = wordmath.generate(48, seed=12, exclude={r["question"] for r in train})
    validation = wordmath.generate(40, seed=13, exclude={r["question"] for r in train + test})
    write_jsonl(root / "wordmath" / "train.jsonl", train)
    write_jsonl(root / "wordmath" / "validation.jsonl", validation)
    write_jsonl(root / "wordmath" / "test.jsonl", test)
    return root


def build_tiny_student(data_dir: Path, out: Path, n_head: int = 4) -> Path:
    """A 2-layer GPT-J (hidden size 64) with its own tokenizer, warm-started for a few seconds on the train split."""
    import torch

    import student
    from tasks import build_prompt, continuation, get_task, load_split

    torch.manual_seed(0)
    task = get_task("wordmath")
    train = load_split("wordmath", "train", str(data_dir))
    pairs = [(build_prompt(task, ex), continuation(task, ex, ex.rationale)) for ex in train]
    tokenizer = student.train_tokenizer([p + c for p, c in pairs], vocab_size=400)
    model = student.build_model(tokenizer, n_layer=2, n_embd=64, n_head=n_head, n_positions=1024)
    student.warm_start(model, tokenizer, pairs, steps=80, batch_size=16, lr=5e-3, log_every=40)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_student(data_dir, tmp_path_factory) -> Path:
    """The suite's student (4 heads of 16): it writes rationales in the right shape, gets some answers right
    and many wrong."""
    return build_tiny_student(data_dir, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def teacher_files(data_dir, tmp_path_factory):
    """Teacher data for 60 train questions (two phrasings each, plus one wrong rationale that
    --answer_filter yes drops) and the student's wrong rationales for them."""
    from tasks import load_split

    folder = tmp_path_factory.mktemp("teacher")
    teacher, negatives = {}, {}
    for ex in load_split("wordmath", "train", str(data_dir))[:60]:
        steps = ex.rationale.split(" Therefore, the answer is")[0]
        teacher[ex.question] = [f"{steps} Therefore, the answer is {ex.gold}.",
                                f"In short: {steps} Therefore, the answer is {ex.gold}.",
                                f"{steps} Therefore, the answer is {int(ex.gold) + 1}."]
        negatives[ex.question] = [f"{steps.split('.')[0]}. So it is {int(ex.gold) + 3}.\nAnswer: {int(ex.gold) + 3} "]
    (folder / "train.round1.json").write_text(json.dumps(teacher))
    (folder / "student.round0.neg4.json").write_text(json.dumps(negatives))
    return folder / "train.round1.json", folder / "student.round0.neg4.json"


def pytest_report_header(config):
    import hf_compat
    return hf_compat.version_line()


# The files that take minutes (chains of stage processes, vLLM engines, the transformers-5.17 sub-run, ZeRO-3 runs, the
# SmolLM2 conversion), slowest first. xdist's loadfile hands files to workers in collection order: starting
# with these, the short files fill in around them instead of one long file running alone at the end.
SLOW_FILES = ("test_reproduce.py", "test_rounds.py", "test_vllm_engine.py", "test_real_student.py", "test_experiments.py",
              "test_versions.py", "test_trainer.py", "test_stage_process.py", "test_teacher_hardening.py", "test_precision.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: tests keep their order in a file
