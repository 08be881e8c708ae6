"""Tasks: one table of datasets, their prompt formats, gold answers and answer extraction.

Every task turns a raw dataset row into an `Example` (processed question text, gold answer,
optional choices and reference rationale). Everything downstream (prompts, grading, teacher
files keyed by question text) works on `Example`s only.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from answers import ANSWER_MARKER, CHOICE_LETTERS, KINDS, AnswerKind, answer_line, number_text
from common import UserError, read_json, read_jsonl

DATA_DIR = "localdataset"
FEWSHOT_DIR = Path(__file__).resolve().parent / "fewshot"


@dataclass
class Example:
    question: str
    gold: str
    choices: list[str] | None = None
    rationale: str | None = None  # reference solution, when the dataset has one
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- raw row -> Example

def _clean_gsm_rationale(text: str) -> str:
    text = re.sub(r"<<[^<>]*>>", "", text)  # calculator annotations
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _from_gsm8k(row: dict) -> Example:
    solution = str(row["answer"])
    if "####" not in solution:
        raise ValueError("answer has no '#### <number>' line")
    body, _, final = solution.rpartition("####")
    return Example(row["question"].strip(), number_text(final), rationale=_clean_gsm_rationale(body) or None)


def _from_svamp(row: dict) -> Example:
    body = str(row["Body"]).strip()
    if not body.endswith("."):
        body += "."
    return Example(f"{body} {str(row['Question']).strip()}", number_text(row["Answer"]))


def _from_multiarith(row: dict) -> Example:
    return Example(str(row["question"]).strip(), number_text(row["final_ans"]))


def _from_cqa(row: dict) -> Example:
    choices = row["choices"]
    texts = list(choices["text"]) if isinstance(choices, dict) else [c["text"] for c in choices]
    if len(texts) != 5:
        raise ValueError(f"expected 5 answer choices, got {len(texts)}")
    return Example(str(row["question"]).strip(), str(row["answerKey"]).strip().lower(), choices=texts)


def _from_sqa(row: dict) -> Example:
    answer = row["answer"]
    yes = answer if isinstance(answer, bool) else str(answer).strip().lower() in ("yes", "true", "1")
    return Example(str(row["question"]).strip(), "Yes" if yes else "No")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # a key of answers.KINDS: "math" | "choice" | "yesno"
    columns: tuple[str, ...]     # raw columns the converter reads
    convert: Callable[[dict], Example]
    hub: tuple[str, str | None] | None  # (dataset name, config) for datasets.load_dataset
    n_demos: int
    max_new_tokens: int
    split_alias: tuple[tuple[str, str], ...] = ()  # e.g. cqa's labelled "test" is the hub "validation"
    generator: str | None = None  # embedded: the module whose splits(args) prepare_data.py writes into localdataset/
    validation_from_train: bool = True  # no usable validation split of its own: carve one (--valid_size)

    @property
    def prepare_hint(self) -> str:
        return "run `python prepare_data.py` first" if self.generator else ""

    @property
    def answers(self) -> AnswerKind:
        """How this task's answers are written and read (answers.KINDS)."""
        return KINDS[self.kind]


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("gsm8k", "math", ("question", "answer"), _from_gsm8k, ("openai/gsm8k", "main"), 3, 256),
    TaskSpec("svamp", "math", ("Body", "Question", "Answer"), _from_svamp, ("ChilleD/SVAMP", None), 3, 192),
    TaskSpec("multiarith", "math", ("question", "final_ans"), _from_multiarith, ("ChilleD/MultiArith", None), 3, 192),
    TaskSpec("cqa", "choice", ("question", "choices", "answerKey"), _from_cqa, ("tau/commonsense_qa", None), 5, 96,
             split_alias=(("test", "validation"),)),
    TaskSpec("sqa", "yesno", ("question", "answer"), _from_sqa, ("ChilleD/StrategyQA", None), 4, 128),
    # Embedded offline tasks, written into localdataset/ by prepare_data.py (GSM8K row format).
    TaskSpec("wordmath", "math", ("question", "answer"), _from_gsm8k, None, 3, 192,
             generator="wordmath", validation_from_train=False),
    TaskSpec("gsm_symbolic", "math", ("question", "answer"), _from_gsm8k, None, 3, 256,
             generator="gsm_symbolic", validation_from_train=False),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"--task: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


# ---------------------------------------------------------------- loading

def _local_candidates(root: Path, task: str, split: str) -> list[Path]:
    stems = [split, f"{task}.{split}", f"{task}_{split}"]
    files = [root / f"{s}.{ext}" for s in stems for ext in ("jsonl", "json", "parquet")]
    return files + [root / s for s in stems] + [root]


def _read_local(path: Path, split: str) -> list[dict] | None:
    """Rows of one local file/folder, or None if `path` is not a dataset for this split."""
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        if path.suffix == ".json":
            data = read_json(path)
            if isinstance(data, dict) and isinstance(data.get(split), list):
                data = data[split]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path}: expected a JSON list of objects (or {{'{split}': [...]}})")
            return data
        if path.suffix == ".parquet":
            import datasets
            try:
                return datasets.Dataset.from_parquet(str(path)).to_list()
            except Exception as err:  # pyarrow raises many types on bad files
                raise UserError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None
        return None
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                return None
            loaded = loaded[split]
        return loaded.to_list()
    return None


def load_raw_rows(task: TaskSpec, split: str, data_dir: str = DATA_DIR) -> tuple[list[dict], str]:
    """Rows of a split and where they came from: local files under data_dir/<task>/, else the hub."""
    root = Path(data_dir) / task.name
    names = [split] + [alias for s, alias in task.split_alias if s == split]
    for name in names:
        for candidate in _local_candidates(root, task.name, name):
            rows = _read_local(candidate, name)
            if rows is not None:
                return rows, str(candidate)
    if task.hub is None:
        raise UserError(f"{root}: no local '{split}' split for task {task.name} ({task.prepare_hint})")
    import datasets
    hub_name, config = task.hub
    hub_split = dict(task.split_alias).get(split, split)
    try:
        ds = datasets.load_dataset(hub_name, config, split=hub_split)
    except Exception as err:  # offline, missing split, auth: all one line for the user
        raise UserError(f"cannot load {hub_name} split '{hub_split}' from the hub and no local copy under "
                        f"{root} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return ds.to_list(), f"hub:{hub_name}"


def carve_validation(rows: list, valid_size: int, task_name: str) -> tuple[list, list]:
    """(train rows, validation rows): a fixed draw of `valid_size` rows (the same for every script and
    seed, so no stage ever trains on what another one validates on), both in file order."""
    if not 0 < valid_size < len(rows):
        raise UserError(f"--valid_size {valid_size}: must be between 1 and {len(rows) - 1} "
                        f"(task {task_name} has {len(rows)} train items)")
    picked = set(random.Random(f"validation:{task_name}").sample(range(len(rows)), valid_size))
    return [r for i, r in enumerate(rows) if i not in picked], [rows[i] for i in sorted(picked)]


def load_split(task_name: str, split: str, data_dir: str = DATA_DIR, limit: int | None = None,
               valid_size: int = 0) -> list[Example]:
    """Examples of a split. Tasks without a validation split of their own (the hub ones) get one with
    `valid_size` > 0: that many train items, which `train` then leaves out; with 0, `train` is whole
    (as in the original) and asking for `validation` is an error."""
    task = get_task(task_name)
    if task.validation_from_train and split == "validation" and valid_size < 1:
        raise UserError(f"task {task.name} has no validation split: pass --valid_size N to hold out N train "
                        f"items (a fixed draw) as validation; training then leaves them out")
    if task.validation_from_train and split in ("train", "validation") and valid_size > 0:
        rows, source = load_raw_rows(task, "train", data_dir)
        train, validation = carve_validation(rows, valid_size, task.name)
        rows, source = (train, f"{source} (train minus --valid_size {valid_size})") if split == "train" else \
            (validation, f"{source} (--valid_size {valid_size} held out)")
    else:
        rows, source = load_raw_rows(task, split, data_dir)
    if not rows:
        raise UserError(f"{source}: split '{split}' of task {task.name} is empty")
    missing = [c for c in task.columns if c not in rows[0]]
    if missing:
        raise UserError(f"{source}: missing column {missing[0]!r} (task {task.name} needs {', '.join(task.columns)})")
    examples = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        try:
            ex = task.convert(row)
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as err:  # null, 1e309, wrong types
            raise UserError(f"{source}: row {i}: cannot read {task.name} item ({type(err).__name__}: {err})") from None
        problem = item_problem(ex)
        if problem:
            raise UserError(f"{source}: row {i}: {problem}")
        examples.append(ex)
    return examples


def text_problem(text) -> str | None:
    """Why `text` cannot go to a tokenizer or a JSON file (None if it can)."""
    if not isinstance(text, str):
        return f"expected text, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text with a lone surrogate character (invalid Unicode)"
    return None


def item_problem(ex: Example) -> str | None:
    """Why an item cannot be used (None if it can): an empty question would merge with every other
    empty one under the same key of the rationale files."""
    for name, text in (("question", ex.question), ("gold answer", ex.gold), *(("choice", c) for c in ex.choices or []),
                       ("rationale", ex.rationale or "")):
        problem = text_problem(text)
        if problem:
            return f"{name}: {problem}"
    if not ex.question.strip():
        return "empty question"
    if not ex.gold.strip():
        return "empty gold answer"
    return None


def has_validation(task_name: str, valid_size: int) -> bool:
    return not get_task(task_name).validation_from_train or valid_size > 0


# ---------------------------------------------------------------- prompts

def fold(text: str) -> str:
    """Rationales live on one line: the blank line is the end-of-answer marker."""
    return " ".join(text.split())


# A prompt ends at the colon ("Reasoning:"); the space after it opens the continuation, so the
# boundary falls where a tokenizer would split the whole text (" The" is one token in byte-level
# BPE, "▁The" in SentencePiece). The original ended prompts in "Reasoning: ", which leaves a lone
# space token that pretrained byte-level tokenizers use almost only before digits.
PROMPT_FORMAT = "natural-boundary"
BOUNDARY = " "


def question_block(task: TaskSpec, ex: Example, rationale: bool) -> str:
    if task.answers.lists_choices:
        options = "\n".join(f"({letter}) {text}" for letter, text in zip(CHOICE_LETTERS, ex.choices or []))
        return f"Question: {ex.question}\nAnswer Choices:\n{options}\nAnswer:"
    return f"Question: {ex.question}\nReasoning:" if rationale else f"Question: {ex.question}\nAnswer:"


def as_continuation(body: str) -> str:
    return BOUNDARY + body


def continuation(task: TaskSpec, ex: Example, rationale_text: str | None) -> str:
    """Target text after the prompt: rationale + answer line (math, sqa) or the rationale alone (cqa),
    opening with the boundary space."""
    if rationale_text is None:
        return as_continuation(task.answers.answer_only_target(ex.gold))
    if not task.answers.has_answer_line:
        return as_continuation(fold(rationale_text))
    return as_continuation(fold(rationale_text) + answer_line(ex.gold))


def build_prompt(task: TaskSpec, ex: Example, demos: str = "", rationale: bool = True) -> str:
    return (demos + "\n" if demos else "") + question_block(task, ex, rationale)


def demo_block(task: TaskSpec, ex: Example, rationale: bool) -> str:
    rationale_text = ex.rationale if rationale else None
    return question_block(task, ex, rationale) + continuation(task, ex, rationale_text)


def format_demos(blocks: list[str]) -> str:
    return "\n\n".join(b.strip("\n") for b in blocks) + "\n" if blocks else ""


def load_demos(task: TaskSpec, rationale: bool, fewshot_file: str | None = None,
               train: list[Example] | None = None, seed: int = 0) -> str:
    """Few-shot demos: a user file, else drawn from the train split, else our own file fewshot/<task>.txt."""
    if fewshot_file:
        path = Path(fewshot_file)
        if not path.is_file():
            raise UserError(f"--fewshot_file: {path} not found")
        if path.suffix in (".json", ".jsonl"):
            rows = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
            try:
                exs = [Example(r["question"], str(r["answer"]), r.get("choices"), r.get("rationale")) for r in rows]
            except (KeyError, TypeError):
                raise UserError(f"--fewshot_file: {path}: each demo needs 'question' and 'answer'") from None
            return format_demos([demo_block(task, ex, rationale) for ex in exs])
        text = path.read_text(encoding="utf-8").strip("\n")
        if not text:
            raise UserError(f"--fewshot_file: {path} is empty")
        return text + "\n"
    usable = [ex for ex in (train or []) if ex.rationale or not rationale]
    if len(usable) >= task.n_demos:
        picks = random.Random(seed).sample(usable, task.n_demos)
        return format_demos([demo_block(task, ex, rationale) for ex in picks])
    own = FEWSHOT_DIR / f"{task.name}.txt"
    if own.is_file():
        blocks = own.read_text(encoding="utf-8").strip("\n").split("\n\n")
        if not rationale:  # drop the reasoning line, keep question and answer
            blocks = [_answer_only_block(task, b) for b in blocks]
        return format_demos(blocks)
    raise UserError(f"--fewshot: task {task.name} has no demos with rationales in its train split "
                    f"and no {own}; pass --fewshot_file")


def _answer_only_block(task: TaskSpec, block: str) -> str:
    if task.answers.lists_choices:
        letter = task.answers.extract(block.split("\nAnswer: ", 1)[-1], False)
        return block.split("\nAnswer: ", 1)[0] + f"\nAnswer: ({letter})"
    question = block.split("\nReasoning: ")[0]
    answer = block.rsplit("\nAnswer: ", 1)[-1]
    return f"{question}\nAnswer: {answer}"


HINT = "Hint: The final answer should be {}."


def add_hints(task: TaskSpec, prompt: str, gold: str) -> str:
    """STaR's rationalisation prompt (`--hint`): every block of a `build_prompt` prompt gets a hint line
    naming its answer: for math and yes/no before its "Reasoning:" line, the demo's own "Answer:" value
    (the asked question: `gold`); for choices before its "Answer:" line, the demo's first "(x)" in that
    line (the asked question: "(gold)")."""
    choice = task.answers.lists_choices
    anchor = "Answer:" if choice else "Reasoning:"
    blocks = []
    for block in prompt.split("\n\n"):
        lines = block.split("\n")
        at = max((i for i, line in enumerate(lines) if line.startswith(anchor)), default=None)
        if at is None:
            raise UserError(f"--hint: a prompt block has no line starting with {anchor!r}: {block[:80]!r}")
        answers = [line[len("Answer:"):].strip() for line in lines if line.startswith("Answer:")]
        if choice:
            letters = re.findall(rf"\(([{CHOICE_LETTERS}])\)", answers[-1]) if answers else []
            answer = f"({letters[0] if letters else gold})"
        else:
            answer = answers[-1] if answers else gold
        blocks.append("\n".join(lines[:at] + [HINT.format(answer)] + lines[at:]))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- answer extraction

def extract_answer(task: TaskSpec, generated: str, strict: bool = False, rationale: bool = True) -> str | None:
    """Prediction from the generated continuation; None never matches a gold answer.

    In answer-only mode the continuation *is* the answer line, so it is read as one."""
    if not rationale and task.answers.has_answer_line:
        generated = f"{ANSWER_MARKER}: {generated}"
    return task.answers.extract(generated, strict)


def answers_match(task: TaskSpec, prediction: str | None, gold: str) -> bool:
    """Numeric comparison for math ('19.0' == '19'); exact letter / Yes-No otherwise."""
    return prediction is not None and task.answers.same(prediction, gold)


def grade(task: TaskSpec, generated: str, gold: str, rationale: bool = True) -> dict:
    """Strict and flexible prediction and correctness of one generated continuation."""
    flexible = extract_answer(task, generated, strict=False, rationale=rationale)
    strict = extract_answer(task, generated, strict=True, rationale=rationale)
    return {"prediction": flexible, "strict_prediction": strict,
            "correct": answers_match(task, flexible, gold), "strict_correct": answers_match(task, strict, gold)}
