"""Bad input, case by case, across the five scripts: each ends in exactly one `error:` line that names
the flag or file at fault, exit status 2, no traceback, and nothing written to the output folder.

The cases run in-process (the scripts' `main`, as the command line calls it) so the table stays fast;
three of them also run as real commands, to check the exit status and the timing users see."""
from __future__ import annotations

import json
import os
import subprocess
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import infer
import infer_student_wrong
import query_teacher
import run_rounds
import run_trainer
from conftest import run_script, write_jsonl

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {"infer": infer, "exam": infer_student_wrong, "train": run_trainer, "teacher": query_teacher,
           "rounds": run_rounds}


@dataclass
class Case:
    script: str
    argv: list[str]  # after the common flags; {student}, {data}, {out}, {bad_*} are filled in per run
    names: str       # the error line must contain this (the flag or the file)


# Placeholders: {student} a tiny model, {data} a good data folder, {out} the (checked) output folder,
# {bad_data:<kind>} a data folder with one broken row, {bad_model:<kind>} a broken model folder, {file} a file.
CASES = {
    # ---- infer.py: flag values
    "infer batch 0": Case("infer", ["--batch", "0"], "--batch"),
    "infer batch negative": Case("infer", ["--batch", "-3"], "--batch"),
    "infer max_new_tokens -1": Case("infer", ["--max_new_tokens", "-1"], "--max_new_tokens"),
    "infer limit -5": Case("infer", ["--limit", "-5"], "--limit"),
    "infer sample_num -2": Case("infer", ["--sample_num", "-2"], "--sample_num"),
    "infer limit and sample_num disagree": Case("infer", ["--sample_num", "7"], "--limit 4 and --sample_num 7"),
    "train lr given twice": Case("train", ["--lr", "1e-5", "--learning_rate", "2e-5"], "--lr 1e-5 and --learning_rate 2e-5"),
    "infer valid_size -1": Case("infer", ["--valid_size", "-1"], "--valid_size"),
    "infer unknown task": Case("infer", ["--task", "nosuch"], "nosuch"),
    "infer unknown split": Case("infer", ["--test_on", "nosplit"], "nosplit"),
    "infer fp16 and bf16": Case("infer", ["--fp16", "yes", "--bf16", "yes"], "--fp16"),
    "infer device without that gpu": Case("infer", ["--device", "99"], "--device"),
    "infer hint without filter": Case("infer", ["--hint", "--fewshot"], "--hint"),
    "infer hint filter missing": Case("infer", ["--hint", "--fewshot", "--hint_filter_path", "{out}/nowhere.json"],
                                      "--hint_filter_path"),
    # ---- infer.py: models
    "infer checkpoint missing": Case("infer", ["--checkpoint", "{out}/no_model"], "--checkpoint"),
    "infer corrupt config.json": Case("infer", ["--checkpoint", "{bad_model:config}"], "--checkpoint"),
    "infer truncated safetensors": Case("infer", ["--checkpoint", "{bad_model:weights}"], "--checkpoint"),
    "infer model folder without a tokenizer": Case("infer", ["--load", "{bad_model:tokenizer}"], "holds no tokenizer"),
    "infer unknown hub name offline": Case("infer", ["--load", "nobody/no-such-model-xyz"], "--load"),
    # ---- infer.py: data
    "infer null question": Case("infer", ["--data_dir", "{bad_data:null_question}"], "test.jsonl"),
    "infer gold 1e309": Case("infer", ["--data_dir", "{bad_data:huge_gold}"], "test.jsonl"),
    "infer lone surrogate": Case("infer", ["--data_dir", "{bad_data:surrogate}"], "test.jsonl"),
    "infer empty question": Case("infer", ["--data_dir", "{bad_data:empty_question}"], "test.jsonl"),
    "infer output_dir is a file": Case("infer", ["--output_dir", "{file}"], "--output_dir"),
    # ---- infer_student_wrong.py
    "exam temperature -1": Case("exam", ["--temperature", "-1"], "--temperature"),
    "exam temperature nan": Case("exam", ["--temperature", "nan"], "--temperature"),
    "exam top_k -1": Case("exam", ["--top_k", "-1"], "--top_k"),
    "exam num_return_sequences 0": Case("exam", ["--num_return_sequences", "0"], "--num_return_sequences"),
    "exam sample_num -2": Case("exam", ["--sample_num", "-2"], "--sample_num"),
    "exam batch 0": Case("exam", ["--batch", "0"], "--batch"),
    "exam output_dir is a file": Case("exam", ["--output_dir", "{file}"], "--output_dir"),
    "exam surrogate in train": Case("exam", ["--data_dir", "{bad_data:surrogate}"], "train.jsonl"),
    # ---- run_trainer.py
    "train lr -1": Case("train", ["--lr", "-1"], "--lr"),
    "train epoch -1": Case("train", ["--epoch", "-1"], "--epoch"),
    "train max_length -5": Case("train", ["--max_length", "-5"], "--max_length"),
    "train batch 0": Case("train", ["--train_bsz", "0"], "--train_bsz"),
    "train teacher_data_random 2": Case("train", ["--teacher_data_random", "2"], "--teacher_data_random"),
    "train cl_neg_form bogus": Case("train", ["--cl_neg_form", "bogus"], "--cl_neg_form"),
    "train lr_scheduler_type bogus": Case("train", ["--lr_scheduler_type", "bogus"], "--lr_scheduler_type"),
    "train lr_scheduler_type needing kwargs": Case("train", ["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type"),
    "train save_strategy bogus": Case("train", ["--save_strategy", "sometimes"], "--save_strategy"),
    "train save_strategy best": Case("train", ["--save_strategy", "best"], "--save_strategy"),
    "rounds lr_scheduler_type bogus": Case("rounds", ["--lr_scheduler_type", "bogus"], "--lr_scheduler_type"),
    "infer engine bogus": Case("infer", ["--engine", "tgi"], "--engine"),
    "exam temperature 0": Case("exam", ["--temperature", "0"], "--temperature"),
    "infer self_consistency -1": Case("infer", ["--self_consistency", "-1"], "--self_consistency"),
    "train first eval without eval": Case("train", ["--do_first_eval", "yes"], "--do_first_eval"),
    "train cl_clip without lm loss": Case("train", ["--mle", "no", "--cl_clip", "yes", "--contrastive", "yes",
                                                    "--cl_pos_path", "{teacher}", "--cl_neg_path", "{teacher}"], "--cl_clip"),
    "train deepspeed malformed": Case("train", ["--deepspeed", "{malformed_json}"], "--deepspeed"),
    "train compile with deepspeed": Case("train", ["--torch_compile", "yes", "--deepspeed", "ds_stage3_config.json"],
                                         "--torch_compile"),
    "train deepspeed missing": Case("train", ["--deepspeed", "{out}/nowhere.json"], "--deepspeed"),
    "train teacher file surrogate": Case("train", ["--teacher_data", "{surrogate_teacher}"], "--teacher_data"),
    "train teacher file not an object": Case("train", ["--teacher_data", "{list_teacher}"], "--teacher_data"),
    "train resume path missing": Case("train", ["--resume", "{out}/checkpoint-7"], "--resume"),
    "train output_dir is a file": Case("train", ["--output_dir", "{file}"], "--output_dir"),
    "train truncated safetensors": Case("train", ["--checkpoint", "{bad_model:weights}"], "--checkpoint"),
    "train lora target not a linear layer": Case("train", ["--lora_r", "4", "--lora_targets", "attn"], "not a linear layer"),
    "train model folder without a tokenizer": Case("train", ["--load", "{bad_model:tokenizer}"], "holds no tokenizer"),
    "train world_size not a multiple": Case("train", ["--device", "0,1", "--world_size", "3"], "--world_size"),
    "train null question in train": Case("train", ["--data_dir", "{bad_data:null_question}"], "train.jsonl"),
    # ---- query_teacher.py
    "teacher num_samples 0": Case("teacher", ["--num_samples", "0"], "--num_samples"),
    "teacher unknown mode": Case("teacher", ["--mode", "sometimes"], "--mode"),
    "teacher max_cost negative": Case("teacher", ["--max_cost", "-1"], "--max_cost"),
    "teacher feedback without file": Case("teacher", ["--mode", "feedback"], "--student_wrong"),
    # ---- run_rounds.py
    "rounds exam_limit -1": Case("rounds", ["--exam_limit", "-1"], "--exam_limit"),
    "rounds zero rounds": Case("rounds", ["--rounds", "0"], "--rounds"),
    "rounds unknown arm": Case("rounds", ["--arms", "lm,magic"], "--arms"),
    "rounds unknown backend": Case("rounds", ["--backend", "carrier-pigeon"], "--backend"),
    "rounds lr -1": Case("rounds", ["--lr", "-1"], "--lr"),
    "rounds real student without lr": Case("rounds", [], "--lr"),
    "rounds real student without cl_p": Case("rounds", ["--lr", "1e-3"], "--cl_p"),  # nor is its margin
    # ---- the drivers check every stage before the first one runs
    "rounds device without that gpu": Case("rounds", ["--lr", "1e-3", "--cl_p", "0.1", "--device", "99"], "--device 99"),
    "rounds student is a file": Case("rounds", ["--lr", "1e-3", "--cl_p", "0.1", "--student", "{file}"], "--student"),
    "rounds student without weights": Case("rounds", ["--lr", "1e-3", "--cl_p", "0.1", "--student", "{out}"], "--student"),
    "rounds engine vllm missing": Case("rounds", ["--lr", "1e-3", "--cl_p", "0.1", "--engine", "vllm"], "--engine vllm"),  # the toy student's rate is not a default for others
}


def common_flags(script: str, student: Path, data: Path, out: Path, teacher: Path) -> list[str]:
    base = ["--task", "wordmath", "--data_dir", str(data)]
    if script in ("infer", "exam"):
        return base + ["--load", str(student), "--output_dir", str(out), "--limit", "4"]
    if script == "train":
        return base + ["--load", str(student), "--teacher_data", str(teacher), "--output_dir", str(out),
                       "--max_steps", "1"]
    if script == "teacher":
        return base + ["--backend", "offline", "--output_dir", str(out), "--limit", "4"]
    return ["--task", "wordmath", "--data_dir", str(data), "--student", str(student), "--workdir", str(out)]


BAD_ROWS = {"null_question": {"question": None}, "huge_gold": {"answer": "1e309"},
            "surrogate": {"question": "How many \ud800 apples?"}, "empty_question": {"question": "   "}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir, tiny_student, teacher_files):
    """Files every case may point at, made once."""
    root = tmp_path_factory.mktemp("bad")
    made = {"student": tiny_student, "data": data_dir, "teacher": teacher_files[0]}
    made["file"] = root / "a_file"
    made["file"].write_text("not a folder")
    made["malformed_json"] = root / "ds.json"
    made["malformed_json"].write_text('{"zero_optimization": {"stage": 3,}')
    made["surrogate_teacher"] = root / "surrogate_teacher.json"
    made["surrogate_teacher"].write_text(json.dumps({"How many \ud800?": ["3 + 4 = 7. Therefore, the answer is 7."]}))
    made["list_teacher"] = root / "list_teacher.json"
    made["list_teacher"].write_text(json.dumps([["q", "r"]]))
    for kind, change in BAD_ROWS.items():
        folder = root / f"data_{kind}" / "wordmath"
        for split in ("train", "validation", "test"):
            rows = [json.loads(line) for line in (data_dir / "wordmath" / f"{split}.jsonl").read_text().splitlines()]
            rows[0] = {**rows[0], **change}
            write_jsonl(folder / f"{split}.jsonl", rows)
        made[f"bad_data:{kind}"] = folder.parent
    for kind in ("config", "weights", "tokenizer"):
        folder = root / f"model_{kind}"
        shutil.copytree(tiny_student, folder)
        if kind == "config":
            (folder / "config.json").write_text('{"model_type": "gptj", "n_layer": ')
        elif kind == "tokenizer":  # weights and config only, as the original saved its checkpoints
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
                (folder / name).unlink(missing_ok=True)
        else:
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        made[f"bad_model:{kind}"] = folder
    return made


def fill(argv: list[str], made: dict, out: Path) -> list[str]:
    values = {**{k: str(v) for k, v in made.items()}, "out": str(out)}
    filled = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        filled.append(arg)
    return filled


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(name, inputs, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    argv = common_flags(case.script, inputs["student"], inputs["data"], out, inputs["teacher"]) + fill(case.argv, inputs, out)
    monkeypatch.setattr(sys, "argv", [f"{case.script}.py", *argv])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[case.script].main()
    assert exit_info.value.code == 2, name
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    assert case.names in errors[0], errors[0]
    written = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    assert not written, written


def test_the_table_is_large_and_covers_every_script():
    assert len(CASES) >= 40
    assert {case.script for case in CASES.values()} == set(SCRIPTS)


@pytest.mark.parametrize("argv, names", [
    (["infer_student_wrong.py", "--output_dir", "{file}"], "--output_dir"),
    (["run_trainer.py", "--deepspeed", "{malformed_json}"], "--deepspeed"),
    (["infer.py", "--data_dir", "{bad_data:surrogate}"], "test.jsonl"),
])
def test_real_commands_fail_fast_with_exit_2(argv, names, inputs, tmp_path):
    """As a user runs them: exit status 2, one line, and no time spent loading before the check."""
    script = {"infer_student_wrong.py": "exam", "run_trainer.py": "train", "infer.py": "infer"}[argv[0]]
    out = tmp_path / "out"
    flags = common_flags(script, inputs["student"], inputs["data"], out, inputs["teacher"])
    started = time.time()
    result = run_script(argv[0], *flags, *fill(argv[1:], inputs, out))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], result.stderr[-2000:]
    assert time.time() - started < 60


@pytest.mark.parametrize("script, argv, names", [
    ("infer", ["--batch", "many"], "--batch"),
    ("train", ["--no_such_flag", "1"], "--no_such_flag"),
])
def test_argparse_errors_are_one_line_too(script, argv, names, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and names in err


@pytest.mark.parametrize("argv", [
    ["run_trainer.py", "--help"], ["run_trainer.py", "--task", "nope"], ["run_trainer.py", "--lr", "abc"],
    ["infer.py", "--help"], ["infer.py", "--task", "nope"], ["infer_student_wrong.py", "--help"],
    ["infer_student_wrong.py", "--num_return_sequences", "0"], ["run_rounds.py", "--help"],
    ["run_rounds.py", "--task", "nope"], ["reproduce.py", "--help"], ["query_teacher.py", "--help"],
], ids=" ".join)
def test_help_and_bad_flags_answer_before_torch_is_imported(argv):
    """--help and a flag-level mistake are answered from the flags alone: torch (3-4 s to import here, most of a
    script's start-up) is not imported on the way. Import order is checked, not time, so this cannot flake."""
    probe = ("import runpy, sys\n"
             f"sys.argv = {argv!r}\n"
             "try:\n"
             f"    runpy.run_path({argv[0]!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    print('exit', stop.code, 'torch' in sys.modules, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    last = done.stdout.strip().splitlines()[-1]
    code, torch_imported = last.split()[1], last.split()[2]
    assert code in ("0", "2", "None"), done.stdout + done.stderr
    assert torch_imported == "False", f"{' '.join(argv)} imported torch before answering"


def test_enum_flags_passed_to_training_arguments_follow_the_library():
    """--lr_scheduler_type and --save_strategy offer transformers' own values, less those named with a reason."""
    from typing import get_args

    from transformers.trainer_utils import SaveStrategy, SchedulerType

    import args as args_mod
    offered = set(get_args(args_mod.LrScheduler)) - {"warmup_log"}
    library = {s.value for s in SchedulerType}
    assert offered | set(args_mod.SCHEDULERS_LEFT_OUT) == library and not offered & set(args_mod.SCHEDULERS_LEFT_OUT)
    assert set(get_args(args_mod.SaveStrategy)) == {s.value for s in SaveStrategy} - {"best"}
