"""The original's inference behaviours (evaluation and exam), each held to values written out by hand
from the original's rules: answer reading, --sample_num, --decode_eos_token, --hint, the defaults,
the Acc file, the cleaned texts, loading its pickled checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distributed
import generation
import infer
import infer_student_wrong
import model_loading
import stages
from answers import clean_choice, clean_math, clean_yesno
from args import ExamArguments, InferArguments
from common import UserError
from conftest import run_script
from driver_args import RoundsArguments
from flags import parse, to_argv
from tasks import Example, add_hints, build_prompt, format_demos, get_task, load_split


def run_infer(*argv: str) -> dict:
    return infer.run(parse(InferArguments, list(argv)))


def common_flags(student: Path, data_dir: Path, out: Path) -> list[str]:
    return ["--task", "wordmath", "--data_dir", str(data_dir), "--checkpoint", str(student), "--batch", "8",
            "--max_new_tokens", "24", "--output_dir", str(out)]


@pytest.fixture
def generate_kwargs(monkeypatch) -> list[dict]:
    """The keyword arguments every `model.generate` call gets."""
    from transformers import GenerationMixin

    calls, real = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


# ---------------------------------------------------------------- 1. cqa: the first choice of the first line

@pytest.mark.parametrize("text,flexible,strict", [
    ("(b) is wrong, the answer is (c)", "b", "c"),
    ("Milk stays cold in the fridge (b). The oven (c) is hot.", "b", None),
    ("e", "e", None),
    ("Therefore, the answer is shelf (c), not (a).\n(d)", "c", "c"),
])
def test_cqa_answer_is_the_first_choice_of_the_first_line(text, flexible, strict):
    cqa = get_task("cqa")
    assert cqa.answers.extract(text, False) == flexible
    assert cqa.answers.extract(text, True) == strict


# ---------------------------------------------------------------- 7. cleaned texts

@pytest.mark.parametrize("raw,cleaned", [
    ("2 + 3 = 5. So 5 pens.\nAnswer: 5 pens and more\n\nQuestion: next", "2 + 3 = 5. So 5 pens.\nAnswer: 5"),
    ("  She has 4 + 4 = 8. Therefore, the answer is 8. Then 9.", "She has 4 + 4 = 8. Therefore, the answer is 8"),
    ("Total 1,250 + 750 = 2,000 dollars in all", "Total 1,250 + 750 = 2,000"),
    ("We do not know.\nAnswer: unknown, sorry", "We do not know.\nAnswer: unknown,"),
    ("no numbers here", "no numbers here"),
    # intended difference: the original cut at the first "5" of the text, inside "15" ("He had 15")
    ("He had 15 apples and ate 5 of them.", "He had 15 apples and ate 5"),
])
def test_math_text_is_cut_just_after_its_answer(raw, cleaned):
    assert clean_math(raw) == cleaned


def test_yesno_and_choice_texts_are_cleaned_as_the_original():
    assert clean_yesno("Cats cannot fly. So no.\nAnswer: No \n\nQuestion: x") == "Cats cannot fly. So no.\nAnswer: No "
    assert clean_choice("The fridge keeps milk cold (b). Also (c).\nQuestion: next") == "The fridge keeps milk cold (b)."
    assert clean_choice("  d  ") == "d"
    assert clean_choice("Therefore, the answer is car (d)") == "Therefore, the answer is car (d)"


def test_wrong_rationales_are_cleaned_then_deduplicated():
    task, ex = get_task("wordmath"), Example("How many?", "7")
    outputs = [["3 + 4 = 8.\nAnswer: 8 and then", "3 + 4 = 8.\nAnswer: 8 or so", "3 + 4 = 7.\nAnswer: 7"]]
    samples, wrong = infer_student_wrong.collect_mistakes(task, [ex], outputs, rationale=True)
    assert wrong == {"How many?": ["3 + 4 = 8.\nAnswer: 8"]}
    assert [s["rationale"] for s in samples] == outputs[0] and [s["correct"] for s in samples] == [False, False, True]


# ---------------------------------------------------------------- 4. hints (pure)

def test_math_hint_prompt():
    task = get_task("gsm8k")
    demos = format_demos(["Question: Ann has 2 cats and gets 1 more. How many?\nReasoning: 2 + 1 = 3.\nAnswer: 3",
                          "Question: Bo had 5 pens and lost 2. How many?\nReasoning: 5 - 2 = 3. Then 3 + 1 = 4.\nAnswer: 4"])
    prompt = build_prompt(task, Example("Cy has 6 eggs and eats 2. How many?", "4"), demos)
    assert add_hints(task, prompt, "4") == (
        "Question: Ann has 2 cats and gets 1 more. How many?\n"
        "Hint: The final answer should be 3.\n"
        "Reasoning: 2 + 1 = 3.\n"
        "Answer: 3\n"
        "\n"
        "Question: Bo had 5 pens and lost 2. How many?\n"
        "Hint: The final answer should be 4.\n"
        "Reasoning: 5 - 2 = 3. Then 3 + 1 = 4.\n"
        "Answer: 4\n"
        "\n"
        "Question: Cy has 6 eggs and eats 2. How many?\n"
        "Hint: The final answer should be 4.\n"
        "Reasoning:")


def test_yesno_hint_prompt():
    task = get_task("sqa")
    demos = format_demos(["Question: Can fish swim?\nReasoning: Fish live in water.\nAnswer: Yes"])
    prompt = build_prompt(task, Example("Do rocks float?", "No"), demos)
    assert add_hints(task, prompt, "No") == (
        "Question: Can fish swim?\nHint: The final answer should be Yes.\nReasoning: Fish live in water.\nAnswer: Yes\n\n"
        "Question: Do rocks float?\nHint: The final answer should be No.\nReasoning:")


def test_choice_hint_prompt_goes_before_the_answer_line():
    task = get_task("cqa")
    demos = format_demos(["Question: Where is milk kept?\nAnswer Choices:\n(a) oven\n(b) fridge\n"
                          "Answer: Not the oven (a): the fridge. Therefore, the answer is fridge (b)."])
    prompt = build_prompt(task, Example("What cuts paper?", "c", choices=["rock", "glue", "scissors", "tape", "ink"]), demos)
    assert add_hints(task, prompt, "c") == (
        "Question: Where is milk kept?\nAnswer Choices:\n(a) oven\n(b) fridge\n"
        "Hint: The final answer should be (a).\n"  # the line's first choice, as the original read it
        "Answer: Not the oven (a): the fridge. Therefore, the answer is fridge (b).\n\n"
        "Question: What cuts paper?\nAnswer Choices:\n(a) rock\n(b) glue\n(c) scissors\n(d) tape\n(e) ink\n"
        "Hint: The final answer should be (c).\n"
        "Answer:")


def test_hint_needs_an_anchor_line_in_every_block():
    task = get_task("gsm8k")
    with pytest.raises(UserError, match="--hint"):
        add_hints(task, "Question: A?\nAnswer: 1\n\nQuestion: B?\nReasoning: ", "2")


@pytest.mark.parametrize("argv,flag", [
    (["--hint"], "--hint_filter_path"),
    (["--hint", "--hint_filter_path", "Acc1.json", "--fewshot", "--rationale", "no"], "--rationale"),
    (["--hint", "--hint_filter_path", "Acc1.json"], "--fewshot"),
    (["--hint_filter_path", "Acc1.json"], "--hint"),
])
def test_hint_flag_errors_name_the_flag(argv, flag):
    with pytest.raises(UserError, match=flag):
        parse(InferArguments, argv)


def test_hint_filter_file_must_be_an_acc_file(tmp_path):
    with pytest.raises(UserError, match="--hint_filter_path: .* not found"):
        infer.wrong_questions(str(tmp_path / "Acc50.0000.json"))
    negatives = tmp_path / "student_wrong.json"
    negatives.write_text(json.dumps({"How many?": ["3 + 4 = 8."]}))
    with pytest.raises(UserError, match="--hint_filter_path: .* not an Acc"):
        infer.wrong_questions(str(negatives))


def test_hint_evaluates_the_wrong_questions_with_hinted_prompts(tiny_student, data_dir, tmp_path, monkeypatch):
    test = load_split("wordmath", "test", str(data_dir))
    acc = tmp_path / "Acc33.3333.json"
    acc.write_text(json.dumps({"acc": 33.3333, "results": [
        {"question": test[4].question, "correct": False}, {"question": test[0].question, "correct": True},
        {"question": test[2].question, "correct": False}]}))
    prompts, real = [], generation.generate

    def spy(model, tokenizer, batch_prompts, cfg, **kwargs):
        prompts.extend(batch_prompts)
        return real(model, tokenizer, batch_prompts, cfg, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    flags = common_flags(tiny_student, data_dir, tmp_path / "star") + ["--hint", "--hint_filter_path", str(acc), "--fewshot"]
    result = run_infer(*flags)
    assert [r["question"] for r in result["results"]] == [test[2].question, test[4].question]  # split order
    for prompt, ex in zip(prompts, (test[2], test[4])):
        assert prompt.endswith(f"Question: {ex.question}\nHint: The final answer should be {ex.gold}.\nReasoning:")
        assert prompt.count("\nHint: The final answer should be ") == 1 + get_task("wordmath").n_demos
    # the filter applies before --sample_num, as the original selected after filtering
    first = run_infer(*flags, "--sample_num", "1", "--output_dir", str(tmp_path / "star1"))
    assert [r["question"] for r in first["results"]] == [test[2].question]


# ---------------------------------------------------------------- 2, 3, 5, 6: one evaluation, one exam

def test_evaluation_defaults_sample_num_and_the_acc_file(tiny_student, data_dir, tmp_path, generate_kwargs, capsys):
    out = tmp_path / "eval"
    result = run_infer(*common_flags(tiny_student, data_dir, out), "--sample_num", "6")  # no --rationale, no --fp16
    assert "note: --fp16 default ignored on CPU: float32" in capsys.readouterr().out
    data = json.loads(Path(result["path"]).read_text())
    test = load_split("wordmath", "test", str(data_dir))[:6]

    assert data["total"] == 6 and [r["question"] for r in data["results"]] == [ex.question for ex in test]
    assert data["args"]["rationale"] is True and data["args"]["limit"] == 6
    assert data["acc"] == pytest.approx(data["correct"] / 6 * 100)  # percent, as the original
    assert Path(result["path"]).name == f"Acc{data['correct'] / 6 * 100:.4f}.json"
    assert {"args", "correct", "total", "acc", "results", "gen_config"} <= set(data)
    assert data["accuracy"] == pytest.approx(data["correct"] / 6)
    assert data["strict_accuracy"] == pytest.approx(data["strict_correct"] / 6)
    for item, ex in zip(data["results"], test):
        assert item["answer"] == ex.rationale and item["final_ans"] == ex.gold
        assert item["generated"] == clean_math(item["raw_generated"])
        assert item["pred"] == get_task("wordmath").answers.extract(item["raw_generated"], False)
        assert set(item) >= {"correct", "strict_prediction", "strict_correct"}
    assert stages.evaluation_result(out) == {"acc": data["accuracy"], "strict_acc": data["strict_accuracy"],
                                      "correct": data["correct"], "total": 6, "file": result["path"]}

    from model_loading import load_tokenizer

    special = load_tokenizer(str(tiny_student)).all_special_ids
    assert data["gen_config"]["begin_suppress_tokens"] == special and data["gen_config"]["do_sample"] is False
    assert generate_kwargs and all(call["begin_suppress_tokens"] == special for call in generate_kwargs)

    generate_kwargs.clear()
    run_infer(*common_flags(tiny_student, data_dir, tmp_path / "eval_no"), "--sample_num", "2", "--decode_eos_token", "no")
    assert generate_kwargs and not any("begin_suppress_tokens" in call for call in generate_kwargs)


def test_exam_sample_num_selects_questions_and_num_return_sequences_samples(tiny_student, data_dir, tmp_path,
                                                                           generate_kwargs):
    out = tmp_path / "exam"
    argv = common_flags(tiny_student, data_dir, out) + ["--sample_num", "3", "--num_return_sequences", "2"]
    summary = infer_student_wrong.run(parse(ExamArguments, argv))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    train = load_split("wordmath", "train", str(data_dir))[:3]
    assert summary["questions"] == 3 and len(samples) == 6 and "pass@2" in summary
    assert [s["question"] for s in samples] == [ex.question for ex in train for _ in range(2)]
    assert summary["args"]["rationale"] is True
    assert all(call["num_return_sequences"] == 2 and "begin_suppress_tokens" in call for call in generate_kwargs)
    wrong = json.loads((out / "student_wrong.json").read_text())
    assert all(text == clean_math(text) for texts in wrong.values() for text in texts)


def test_sample_num_is_written_for_limit_and_rounds_pass_num_return_sequences(tmp_path):
    from rounds import RoundDriver

    assert to_argv(InferArguments, limit=6) == ["--sample_num", "6"]
    driver = RoundDriver(parse(RoundsArguments, ["--workdir", str(tmp_path), "--num_return_sequences", "3", "--bf16"]))
    exam = parse(ExamArguments, driver.exam_command("ck", tmp_path / "exam")[2:])
    assert (exam.num_return_sequences, exam.limit) == (3, 200)
    evaluation = parse(InferArguments, driver.eval_command("ck", tmp_path / "eval", "test")[2:])
    assert (evaluation.fp16, evaluation.bf16) == (None, True)
    assert infer.inference_dtype(evaluation) == torch.bfloat16  # the driver's --bf16 meets the fp16 default


# ---------------------------------------------------------------- 3. the suppression itself

def test_decode_eos_token_keeps_eos_from_being_the_first_token(tiny_student):
    model, tokenizer = model_loading.load_model(str(tiny_student))
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_token_id] += 1000.0  # eos wins every step unless suppressed
        word = min(i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ") and t[1:].isalpha())
        model.lm_head.bias[word] += 500.0                     # ... and then this space-led word does
    prompt = ["Question: Tom has 3 apples. How many?\nReasoning:"]
    suppressed = generation.generate(model, tokenizer, prompt, generation.SamplingConfig(max_new_tokens=4), progress=False)
    free = generation.generate(model, tokenizer, prompt, generation.SamplingConfig(max_new_tokens=4, suppress_special_first=False),
                               progress=False)
    assert free == [[""]] and suppressed == [[tokenizer.decode([word]).strip()]] and suppressed[0][0]


# ---------------------------------------------------------------- 5. precision defaults

def test_fp16_default_follows_the_device(monkeypatch, capsys):
    assert parse(ExamArguments, []).rationale is True and parse(ExamArguments, []).fp16 is None
    assert infer.inference_dtype(parse(InferArguments, [])) is None
    assert infer.inference_dtype(parse(InferArguments, ["--bf16"])) == torch.bfloat16
    assert capsys.readouterr().out.splitlines() == ["note: --fp16 default ignored on CPU: float32",
                                                    "note: --fp16 default ignored with --bf16: bfloat16"]
    with pytest.raises(UserError, match="--fp16 and --bf16"):
        infer.inference_dtype(parse(InferArguments, ["--fp16", "yes", "--bf16", "yes"]))
    monkeypatch.setattr(distributed, "device", lambda: torch.device("cuda", 0))
    assert infer.inference_dtype(parse(InferArguments, [])) == torch.float16
    assert infer.inference_dtype(parse(InferArguments, ["--fp16", "no"])) is None
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- 8. the original's pickled checkpoints

@pytest.fixture(scope="module")
def pickled_checkpoint(tiny_student, tmp_path_factory) -> Path:
    """The tiny student as the original saved checkpoints: config.json + pytorch_model.bin, no tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("original_ckpt")
    AutoConfig.from_pretrained(tiny_student).save_pretrained(folder)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_student).state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_checkpoint_needs_allow_pickle(pickled_checkpoint, tiny_student, data_dir, tmp_path):
    result = run_script("infer.py", *common_flags(pickled_checkpoint, data_dir, tmp_path / "refused"), "--load", str(tiny_student))
    assert result.returncode == 2 and not (tmp_path / "refused").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == (
        f"error: --checkpoint: {pickled_checkpoint} holds a pickle file (pytorch_model.bin), and unpickling can run "
        f"code from the file; if you trust it, --allow_pickle yes loads it")


def test_pickled_checkpoint_loads_with_allow_pickle(pickled_checkpoint, tiny_student, data_dir, tmp_path, capsys):
    model, _ = model_loading.load_model(str(pickled_checkpoint), allow_pickle=True, tokenizer_fallback=str(tiny_student))
    reference, _ = model_loading.load_model(str(tiny_student))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    result = run_infer(*common_flags(pickled_checkpoint, data_dir, tmp_path / "eval"), "--load", str(tiny_student),
                       "--allow_pickle", "yes", "--sample_num", "2")
    assert result["total"] == 2
    assert f"holds no tokenizer; using the one of --load {tiny_student}" in capsys.readouterr().out


def test_checkpoint_without_tokenizer_takes_the_originals_default_load():
    """The original's evaluation loaded its tokenizer from --load, default EleutherAI/gpt-j-6B."""
    argv = ["--task", "gsm8k", "--checkpoint", "ckpt"]
    assert infer.base_model(parse(InferArguments, argv)) == "EleutherAI/gpt-j-6B"
    assert infer.base_model(parse(InferArguments, argv + ["--load", "my/base"])) == "my/base"
