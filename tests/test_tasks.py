"""Tasks table: exact prompt strings, answer extraction, dataset loading from every local format."""
from __future__ import annotations

import importlib
import json
import sys

import pytest

import gsm_symbolic
import prepare_data
import tasks
import wordmath
from args import PrepareArguments, StudentArguments
from common import UserError
from conftest import write_jsonl
from tasks import Example, build_prompt, continuation, get_task

GSM_ROW = {"question": "Natalia sold 48 clips. How many?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"}


# ---------------------------------------------------------------- gold answers from raw rows

def test_gold_answers_per_task():
    gsm = get_task("gsm8k").convert(GSM_ROW)
    assert (gsm.question, gsm.gold) == ("Natalia sold 48 clips. How many?", "72")
    assert gsm.rationale == "Natalia sold 48/2 = 24 clips in May. In total 48+24 = 72."
    svamp = get_task("svamp").convert({"Body": "Jack had 8 pens", "Question": "How many now?", "Answer": 6.0})
    assert (svamp.question, svamp.gold) == ("Jack had 8 pens. How many now?", "6")
    svamp2 = get_task("svamp").convert({"Body": "Jack had 8 pens.", "Question": "How many?", "Answer": 2.5})
    assert (svamp2.question, svamp2.gold) == ("Jack had 8 pens. How many?", "2.5")
    assert get_task("multiarith").convert({"question": " Tom has 3. ", "final_ans": "7"}).gold == "7"
    cqa = get_task("cqa").convert({"question": "Where?", "answerKey": "C",
                                   "choices": {"label": list("ABCDE"), "text": ["v", "w", "x", "y", "z"]}})
    assert (cqa.gold, cqa.choices) == ("c", ["v", "w", "x", "y", "z"])
    assert get_task("sqa").convert({"question": "Is it?", "answer": True}).gold == "Yes"
    assert get_task("sqa").convert({"question": "Is it?", "answer": False}).gold == "No"


# ---------------------------------------------------------------- prompt strings

MATH = Example("Tom has 3 apples. He buys 2 more. How many?", "5", rationale="3 + 2 = 5.\nSo 5.")
CQA = Example("Where do you keep milk?", "b", choices=["oven", "fridge", "shelf", "car", "bed"])
SQA = Example("Can a cat fly?", "No")


def test_math_rationale_prompt_and_training_text():
    task = get_task("gsm8k")
    assert build_prompt(task, MATH) == "Question: Tom has 3 apples. He buys 2 more. How many?\nReasoning:"
    assert continuation(task, MATH, MATH.rationale) == " 3 + 2 = 5. So 5.\nAnswer: 5"
    assert build_prompt(task, MATH, demos="DEMO\n") == ("DEMO\n\nQuestion: Tom has 3 apples. He buys 2 more. "
                                                         "How many?\nReasoning:")


def test_answer_only_prompts():
    assert build_prompt(get_task("svamp"), MATH, rationale=False) == "Question: " + MATH.question + "\nAnswer:"
    assert continuation(get_task("svamp"), MATH, None) == " 5"
    assert continuation(get_task("cqa"), CQA, None) == " (b)"
    assert build_prompt(get_task("sqa"), SQA, rationale=False) == "Question: Can a cat fly?\nAnswer:"


def test_cqa_prompt_lists_choices_and_keeps_rationale_as_is():
    task = get_task("cqa")
    assert build_prompt(task, CQA) == ("Question: Where do you keep milk?\nAnswer Choices:\n(a) oven\n(b) fridge\n"
                                       "(c) shelf\n(d) car\n(e) bed\nAnswer:")
    text = "Milk is kept cold.\nTherefore, the answer is fridge (b)."
    assert continuation(task, CQA, text) == " Milk is kept cold. Therefore, the answer is fridge (b)."


def test_sqa_rationale_prompt():
    task = get_task("sqa")
    assert build_prompt(task, SQA) == "Question: Can a cat fly?\nReasoning:"
    assert continuation(task, SQA, "Cats have no wings.") == " Cats have no wings.\nAnswer: No"


def test_demos_drawn_from_train_split_are_blocks_separated_by_blank_lines():
    task = get_task("gsm8k")
    train = [task.convert(GSM_ROW), Example("A?", "1", rationale="r1"), Example("B?", "2", rationale="r2"),
             Example("C?", "3", rationale="r3")]
    demos = tasks.load_demos(task, rationale=True, train=train, seed=0)
    blocks = demos.rstrip("\n").split("\n\n")
    assert len(blocks) == 3 and demos.endswith("\n")
    for block in blocks:
        assert block.startswith("Question: ") and "\nReasoning: " in block and "\nAnswer: " in block
    assert tasks.load_demos(task, rationale=True, train=train, seed=0) == demos  # seeded


@pytest.mark.parametrize("name", ["svamp", "multiarith", "cqa", "sqa"])
def test_own_demo_files_exist_for_tasks_without_gold_rationales(name):
    task = get_task(name)
    demos = tasks.load_demos(task, rationale=True, train=[])
    assert len(demos.strip("\n").split("\n\n")) == task.n_demos
    answer_only = tasks.load_demos(task, rationale=False, train=[])
    assert "Reasoning:" not in answer_only and "\nAnswer: " in answer_only


def test_fewshot_file_text_and_jsonl(tmp_path):
    task = get_task("gsm8k")
    txt = tmp_path / "demos.txt"
    txt.write_text("Question: x?\nReasoning: y.\nAnswer: 1\n\nQuestion: z?\nReasoning: w.\nAnswer: 2\n")
    assert tasks.load_demos(task, True, str(txt)) == "Question: x?\nReasoning: y.\nAnswer: 1\n\nQuestion: z?\nReasoning: w.\nAnswer: 2\n"
    jl = tmp_path / "demos.jsonl"
    write_jsonl(jl, [{"question": "q?", "answer": "4", "rationale": "2 + 2 = 4."}])
    assert tasks.load_demos(task, True, str(jl)) == "Question: q?\nReasoning: 2 + 2 = 4.\nAnswer: 4\n"
    with pytest.raises(UserError, match="--fewshot_file"):
        tasks.load_demos(task, True, str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------- answer extraction

MATH_CASES = [  # (generated continuation, flexible prediction, strict prediction)
    ("3 + 2 = 5.\nAnswer: 5 ", "5", "5"),
    ("He has 1,234 now.\nAnswer: 1,234", "1234", "1234"),
    ("Total $1,000,000.\nAnswer: $1,000,000", "1000000", "1000000"),
    ("It drops to -5 degrees.\nAnswer: -5", "-5", "-5"),
    ("Half is 2.5.\nAnswer: 2.5", "2.5", "2.5"),
    ("So 19.0 apples.\nAnswer: 19.0", "19.0", "19.0"),
    ("The answer is 7.", "7", None),
    ("3 + 4 = 7. Then 7 * 2 = 14.", "14", None),
    ("No numbers here at all.", None, None),
    ("", None, None),
    ("Therefore, the answer is 42. Then 99 more words 100.", "42", None),
    ("5 + 5 = 10.\nAnswer: 10\n\nQuestion: another 77?", "10", "10"),
    ("a 1, b 2\n\nQuestion: 3 + 4 = 7", "2", None),
    ("x = 3.\nAnswer: 12 apples and 13 pears", "12", "12"),
    ("Answer: 8", "8", None),  # no newline before 'Answer': not the structured line
    ("steps 4 then 5.\nAnswer: none", None, None),
    ("Costs $15.50 in total.", "15.50", None),
    ("It ends at 30.", "30", None),
    ("Weight is 0.5 kg.\nAnswer: 0.5", "0.5", "0.5"),
    ("went from 10 to -3.\nAnswer: -3.", "-3", "-3"),
    ("Therefore, the answer is 1,500.", "1500", None),
    ("We get 6.\nAnswer: 6 \nAnswer: 9", "6", "6"),
    ("12 * 3 = 36\nAnswer:36", "36", "36"),
    ("first 3 then 4 and then 5", "5", None),
    ("She pays $3 for each of 4 pens, $12.\nAnswer: 12", "12", "12"),
    ("The sum is 1,000.5.\nAnswer: 1,000.5", "1000.5", "1000.5"),
    ("-7 + 2 = -5.\nAnswer: -5 degrees", "-5", "-5"),
    ("Therefore, the answer is $45.", "45", None),
    ("So 3 + 4 = 7.\nAnswer: 7 \nQuestion: next one 99", "7", "7"),
    ("He ran 5 km on day 1 and 6 km on day 2.\nAnswer: 11.", "11", "11"),
    ("Therefore, the answer is twelve.", None, None),
]


@pytest.mark.parametrize("text,flexible,strict", MATH_CASES)
def test_math_extraction(text, flexible, strict):
    task = get_task("gsm8k")
    assert tasks.extract_answer(task, text) == flexible
    assert tasks.extract_answer(task, text, strict=True) == strict


@pytest.mark.parametrize("pred,gold,match", [
    ("19.0", "19", True), ("19", "19.0", True), ("1234", "1,234", True), ("-5", "-5", True),
    ("2.5", "2.50", True), ("18.99", "19", False), (None, "0", False), ("0", "0", True),
])
def test_numeric_comparison(pred, gold, match):
    assert tasks.answers_match(get_task("gsm8k"), pred, gold) is match


CHOICE_CASES = [
    ("Milk goes cold. Therefore, the answer is fridge (b).", "b", "b"),
    ("(a) is wrong, (c) is right", "a", None),  # the first choice of the line, as the original
    ("b", "b", None),
    ("(D)", "d", None),
    ("nothing useful", None, None),
    ("Therefore, the answer is shelf (c).\n(e) on a later line", "c", "c"),
    ("the answer is (a) or maybe (e)", "a", "a"),
    ("(b) is wrong, the answer is (c).", "b", "c"),
    ("(b).", "b", None),
]


@pytest.mark.parametrize("text,flexible,strict", CHOICE_CASES)
def test_choice_extraction(text, flexible, strict):
    task = get_task("cqa")
    assert tasks.extract_answer(task, text) == flexible
    assert tasks.extract_answer(task, text, strict=True) == strict


YESNO_CASES = [
    (" Cats have no wings.\nAnswer: No", "No", "No"),
    ("Yes, they can swim.\nAnswer: yes", "Yes", "Yes"),
    ("It is not known, so yes.", "Yes", None),
    ("Yes at first, but no.", "No", None),
    ("maybe", None, None),
    ("Nobody knows.\nAnswer: no\n\nAnswer: yes", "No", "No"),
]


@pytest.mark.parametrize("text,flexible,strict", YESNO_CASES)
def test_yesno_extraction(text, flexible, strict):
    task = get_task("sqa")
    assert tasks.extract_answer(task, text) == flexible
    assert tasks.extract_answer(task, text, strict=True) == strict


def test_extraction_table_is_large_enough():
    assert len(MATH_CASES) + len(CHOICE_CASES) + len(YESNO_CASES) >= 40


def test_answer_only_generation_is_read_as_the_answer_line():
    task = get_task("gsm8k")
    assert tasks.grade(task, "19.0", "19", rationale=False) == {
        "prediction": "19.0", "strict_prediction": "19.0", "correct": True, "strict_correct": True}


# ---------------------------------------------------------------- loading

ROWS = [GSM_ROW, {"question": "Sam has 2. He gets 3. How many?", "answer": "2 + 3 = 5.\n#### 5"}]


def _save(fmt: str, root, rows=ROWS):
    folder = root / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        write_jsonl(folder / "test.jsonl", rows)
    elif fmt == "json":
        (folder / "test.json").write_text(json.dumps(rows))
    elif fmt == "parquet":
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "test.parquet"))
    elif fmt == "save_to_disk":
        import datasets
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    elif fmt == "prefixed":
        write_jsonl(folder / "gsm8k.test.jsonl", rows)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "save_to_disk", "prefixed"])
def test_load_split_from_each_local_format(fmt, tmp_path):
    _save(fmt, tmp_path)
    examples = tasks.load_split("gsm8k", "test", str(tmp_path))
    assert [ex.gold for ex in examples] == ["72", "5"]
    assert examples[1].question == "Sam has 2. He gets 3. How many?"


def test_cqa_test_split_falls_back_to_validation(tmp_path):
    row = {"question": "Where?", "answerKey": "A", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}}
    write_jsonl(tmp_path / "cqa" / "validation.jsonl", [row])
    assert tasks.load_split("cqa", "test", str(tmp_path))[0].gold == "a"


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        tasks.load_split("nope", "test", str(tmp_path))
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "solution": "x"}])
    with pytest.raises(UserError, match="missing column 'answer'"):
        tasks.load_split("gsm8k", "test", str(tmp_path))
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        tasks.load_split("gsm8k", "test", str(tmp_path))
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": \n')
    with pytest.raises(UserError, match="malformed JSON"):
        tasks.load_split("gsm8k", "test", str(tmp_path))
    with pytest.raises(UserError, match="prepare_data.py"):
        tasks.load_split("wordmath", "test", str(tmp_path))


# ---------------------------------------------------------------- validation held out of train

def test_valid_size_holds_out_a_fixed_disjoint_part_of_train(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"Steps.\n#### {i}"} for i in range(50)]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    whole = tasks.load_split("gsm8k", "train", str(tmp_path))
    train = tasks.load_split("gsm8k", "train", str(tmp_path), valid_size=10)
    validation = tasks.load_split("gsm8k", "validation", str(tmp_path), valid_size=10)
    assert (len(whole), len(train), len(validation)) == (50, 40, 10)
    assert not {ex.question for ex in train} & {ex.question for ex in validation}
    assert sorted(ex.question for ex in train + validation) == sorted(ex.question for ex in whole)
    again = tasks.load_split("gsm8k", "validation", str(tmp_path), valid_size=10)
    assert [ex.question for ex in again] == [ex.question for ex in validation]  # the same draw in every script
    assert tasks.has_validation("gsm8k", 10) and not tasks.has_validation("gsm8k", 0)
    assert tasks.has_validation("wordmath", 0)


def test_validation_of_a_task_without_one_needs_valid_size(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "Q?", "answer": "S.\n#### 1"}] * 5)
    with pytest.raises(UserError, match="--valid_size N"):
        tasks.load_split("gsm8k", "validation", str(tmp_path))
    with pytest.raises(UserError, match="--valid_size 5: must be between 1 and 4"):
        tasks.load_split("gsm8k", "validation", str(tmp_path), valid_size=5)


# ---------------------------------------------------------------- embedded splits: disjoint by template

SPLITS = ("train", "validation", "test")
SMALL = ("--train_size", "200", "--valid_size", "60", "--test_size", "50")


def run_prepare(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *argv])
    prepare_data.main()


def read_splits(root, task: str) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (root / task / f"{split}.jsonl").read_text().splitlines()]
            for split in SPLITS}


def test_masked_question_hides_every_number_and_nothing_else():
    assert wordmath.masked_question("Mia has 12 apples. She pays $1,234.50 for 3 more.") == \
        "Mia has # apples. She pays $# for # more."
    assert gsm_symbolic.masked_question("Tom ran 5 km on day 2.") == "Tom ran # km on day #."


@pytest.mark.parametrize("task,keys", [("wordmath", {"question", "answer", "steps", "template"}),
                                       ("gsm_symbolic", {"question", "answer", "template"})])
def test_prepared_splits_share_no_template_and_no_masked_question(task, keys, tmp_path, monkeypatch):
    run_prepare(monkeypatch, "--task", task, "--data_dir", str(tmp_path), *SMALL)
    splits = read_splits(tmp_path, task)
    assert [len(splits[s]) for s in SPLITS] == [200, 60, 50]
    assert all(set(row) == keys for rows in splits.values() for row in rows)
    mask = importlib.import_module(task).masked_question
    train_templates = {row["template"] for row in splits["train"]}
    train_masked = {mask(row["question"]) for row in splits["train"]}
    for split in ("validation", "test"):
        assert not {row["template"] for row in splits[split]} & train_templates
        assert not {mask(row["question"]) for row in splits[split]} & train_masked
    assert prepare_data.split_leaks(splits, mask) == []


def test_gsm_symbolic_templates_are_dealt_out_once_by_seed():
    partition = gsm_symbolic.template_partition(1234)
    assert [len(partition[s]) for s in SPLITS] == [59, 13, 13]
    assert set().union(*partition.values()) == set(gsm_symbolic.all_templates())
    assert not partition["train"] & (partition["validation"] | partition["test"])
    assert not partition["validation"] & partition["test"]
    assert gsm_symbolic.template_partition(1234) == partition
    assert gsm_symbolic.template_partition(1235) != partition


@pytest.mark.parametrize("min_steps,max_steps", [(1, 3), (2, 3), (1, 1)])
def test_wordmath_partition_fills_default_sizes_and_keeps_the_steps_mix(min_steps, max_steps):
    splits = wordmath.splits(PrepareArguments(min_steps=min_steps, max_steps=max_steps))
    assert [len(splits[s]) for s in SPLITS] == [2000, 1000, 300]
    assert prepare_data.split_leaks(splits, wordmath.masked_question) == []

    def share(split: str, steps: int) -> float:
        return sum(len(row["steps"]) == steps for row in splits[split]) / len(splits[split])

    for steps in range(min_steps, max_steps + 1):
        assert abs(share("validation", steps) - share("train", steps)) < 0.05
        assert abs(share("test", steps) - share("train", steps)) < 0.07  # 300 problems: a wider sampling spread


def old_way_wordmath(args) -> dict[str, list[dict]]:
    """Splits as they were drawn before the partition: only identical questions kept out."""
    one_step = wordmath.Difficulty(min_steps=1, max_steps=1)  # few templates: overlaps are sure
    train = wordmath.generate(args.train_size, args.seed, one_step)
    test = wordmath.generate(args.test_size, args.seed + 1, one_step, exclude={r["question"] for r in train})
    validation = wordmath.generate(args.valid_size, args.seed + 2, one_step,
                                   exclude={r["question"] for r in train + test})
    return {"train": train, "validation": validation, "test": test}


def old_way_gsm_symbolic(args) -> dict[str, list[dict]]:
    every = set(gsm_symbolic.all_templates())
    return {"train": gsm_symbolic.draw(args.train_size, args.seed, every),
            "validation": gsm_symbolic.draw(args.valid_size, args.seed + 2, every),
            "test": gsm_symbolic.draw(args.test_size, args.seed + 1, every)}


def test_leak_check_fails_on_splits_drawn_the_old_way():
    args = PrepareArguments(train_size=500, valid_size=100, test_size=100)
    wordmath_leaks = prepare_data.split_leaks(old_way_wordmath(args), wordmath.masked_question)
    assert any("validation rows share a masked question with train" in line for line in wordmath_leaks)
    assert any("test rows share a template with train" in line for line in wordmath_leaks)
    gsm_leaks = prepare_data.split_leaks(old_way_gsm_symbolic(args), gsm_symbolic.masked_question)
    assert any("test rows share a template with train" in line for line in gsm_leaks)
    identical = {"train": [{"question": "Q 1?", "template": 0}], "validation": [{"question": "Q 1?", "template": 1}],
                 "test": [{"question": "R 2?", "template": 2}]}
    assert prepare_data.split_leaks(identical, wordmath.masked_question) == [
        "1 of 1 validation rows share a masked question with train (e.g. 'Q #?')",
        "1 of 1 validation rows share a question with train (e.g. 'Q 1?')"]


def test_prepare_data_refuses_leaking_splits_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gsm_symbolic, "splits", old_way_gsm_symbolic)  # wordmath, built first, is clean
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(monkeypatch, "--data_dir", str(tmp_path), *SMALL)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gsm_symbolic: the splits leak, nothing written: ") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_student_settings_change_with_the_train_data(tmp_path):
    import build_student

    args = StudentArguments(data_dir=str(tmp_path))
    train_file = tmp_path / "wordmath" / "train.jsonl"

    def settings_for(rows: list[dict]) -> dict:
        write_jsonl(train_file, rows)
        return build_student.build_settings(args, build_student.warm_start_pairs(args))

    first = settings_for(wordmath.generate(30, seed=1))
    assert settings_for(wordmath.generate(30, seed=1)) == first
    changed = settings_for(wordmath.generate(30, seed=2))
    assert changed != first and changed["train_sha256"] != first["train_sha256"]
    assert {k: v for k, v in changed.items() if k != "train_sha256"} == \
        {k: v for k, v in first.items() if k != "train_sha256"}
