"""How answers are written and read, per task kind: one definition for everyone.

A rationale ends with the final sentence "Therefore, the answer is <answer>." (SPEC §2); a
training target then adds the structured answer line "\\nAnswer: <gold>" (math, yes/no).
Prompts and targets (`tasks.py`), the teacher's instructions (`teacher_templates.py`), its judge
and offline stand-in (`teacher_*.py`), the negatives (`train_data.py`) and the wordmath generator
all take these shapes from here, so rewording one changes every writer and reader together.

`KINDS` is the table of task kinds (like `tasks.TASKS` is the table of datasets): how a kind
extracts a prediction (flexible or strict), cleans a generation down to what records keep,
compares it with gold, shows gold to the teacher, and makes a wrong answer for the offline
teacher's error practice.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

FINAL_PREFIX = "Therefore, the answer is"
ANSWER_MARKER = "\nAnswer"
CHOICE_LETTERS = "abcde"
FINAL_SENTENCE = re.compile(rf"{re.escape(FINAL_PREFIX)} .*?(?:\.(?=\s|$)|$)")   # first one, in a paragraph
CLOSING_FINAL_SENTENCE = re.compile(rf"\s*{re.escape(FINAL_PREFIX)} [^.]*\.?\s*$")  # one that ends a text


def final_sentence(answer: str) -> str:
    return f"{FINAL_PREFIX} {answer}."


def answer_line(gold: str) -> str:
    """The structured line a math / yes-no target ends with (the original's had a trailing space
    before eos: a token no tokenizer would produce there)."""
    return f"{ANSWER_MARKER}: {gold}"


def cut_at_blank_line(text: str) -> str:
    """A blank line ends an answer: generation stops there and the rest is the next demo."""
    return text.split("\n\n", 1)[0]


# ---------------------------------------------------------------- numbers

_NUMBER = re.compile(r"-?\d+\.?\d*")


def number_text(value) -> str:
    """Canonical text of a numeric answer: '1,234' -> '1234', 8.0 -> '8'; other text unchanged."""
    text = str(value).replace(",", "").replace("$", "").strip()
    if re.fullmatch(r"[-+]?\d+(\.0*)?", text):  # integers exactly: a float has 53 bits, gold may have more
        return str(int(text.split(".")[0]))
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number == int(number) else text


def numbers_close(a: float | None, b: float | None) -> bool:
    """Equal up to float noise, relative to the size of b."""
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4f}".rstrip("0").rstrip(".")


def _number_spans(text: str) -> list[tuple[str, int]]:
    """Each number read as `_numbers` reads it, with the index in `text` just after its last digit
    (commas are skipped for reading, so the index is mapped back onto the text as written)."""
    kept = [i for i, ch in enumerate(text) if ch != ","]
    flat = "".join(text[i] for i in kept)
    spans = []
    for match in _NUMBER.finditer(flat):
        value = match.group().rstrip(".")
        spans.append((value, kept[match.start() + len(value) - 1] + 1))
    return spans


def _numbers(text: str) -> list[str]:
    return [value for value, _ in _number_spans(text)]


# ---------------------------------------------------------------- extraction, per kind

def extract_number(text: str, strict: bool = False) -> str | None:
    """SPEC §3: after the answer line (else the final sentence) the first number; else the last one.

    strict: only the structured answer line counts."""
    text = cut_at_blank_line(text)
    markers = [ANSWER_MARKER] if strict else [ANSWER_MARKER, FINAL_PREFIX]
    for marker in markers:
        if marker in text:
            found = _numbers(text.split(marker, 1)[1])
            return found[0] if found else None
    if strict:
        return None
    found = _numbers(text)
    return found[-1] if found else None


_CHOICE = re.compile(r"\(([a-eA-E])\)")
_STRICT_CHOICE = re.compile(rf"{re.escape(FINAL_PREFIX.split(', ', 1)[1])}.*?\(([a-eA-E])\)")  # "the answer is ... (c)"


def _first_line(text: str) -> str:
    return cut_at_blank_line(text.strip()).split("\n", 1)[0].strip()


def extract_choice(text: str, strict: bool = False) -> str | None:
    """The first line only; its FIRST lettered choice is the answer (SPEC §3), a bare letter counts too.
    strict: the first choice after "the answer is"."""
    first_line = _first_line(text)
    if strict:
        match = _STRICT_CHOICE.search(first_line)
        return match.group(1).lower() if match else None
    match = _CHOICE.search(first_line)
    if match:
        return match.group(1).lower()
    bare = re.fullmatch(r"\(?([a-eA-E])\)?[.\s]*", first_line)
    return bare.group(1).lower() if bare else None


_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def extract_yesno(text: str, strict: bool = False) -> str | None:
    text = cut_at_blank_line(text)
    if ANSWER_MARKER in text:
        found = _YESNO.findall(text.split(ANSWER_MARKER, 1)[1])
        return found[0].capitalize() if found else None
    if strict:
        return None
    found = _YESNO.findall(text)
    return found[-1].capitalize() if found else None


# ---------------------------------------------------------------- cleaned text, per kind
# What a record keeps of a generation (the Acc file's `generated`, the exam's wrong rationales): the
# text up to the answer its extractor reads, so the trailing chatter after it is not kept as a negative.

_NEXT_WORD = re.compile(r"\s*:?\s*\S*")  # the colon of an answer line goes with the word after it


def _after_next_word(text: str, start: int) -> int:
    return _NEXT_WORD.match(text, start).end()


def clean_math(text: str) -> str:
    """The first paragraph, cut just after the number `extract_number` reads, where it stands.
    Without a number after the answer marker: the marker and the word after it."""
    text = cut_at_blank_line(text.strip())
    for marker in (ANSWER_MARKER, FINAL_PREFIX):
        if marker in text:
            start = text.index(marker) + len(marker)
            after = _number_spans(text[start:])
            return text[:start + after[0][1]] if after else text[:_after_next_word(text, start)]
    spans = _number_spans(text)
    return text[:spans[-1][1]] if spans else text


def clean_yesno(text: str) -> str:
    return cut_at_blank_line(text.strip())


def clean_choice(text: str) -> str:
    """The first line, cut one character after its first lettered choice (that keeps the full stop)."""
    line = _first_line(text)
    match = _CHOICE.search(line)
    return line[:match.end() + 1].strip() if match else line


def _same_number(prediction: str, gold: str) -> bool:
    try:
        return numbers_close(float(prediction), float(number_text(gold)))
    except ValueError:
        return prediction.strip() == gold.strip()


def _same_text(prediction: str, gold: str) -> bool:
    return prediction.lower() == gold.lower()


def _wrong_number(gold: str, rng: random.Random) -> str:
    try:
        return format_number(float(gold) + rng.choice([-2, -1, 1, 2, 10]))
    except ValueError:
        return gold + "0"


def _choice_gold(gold: str, choices: list[str] | None) -> str:
    return f"{choices[CHOICE_LETTERS.index(gold)]} ({gold})" if choices else gold


# ---------------------------------------------------------------- the table of kinds

@dataclass(frozen=True)
class AnswerKind:
    name: str
    extract: Callable[[str, bool], str | None]          # (generated text, strict) -> prediction
    clean: Callable[[str], str]                           # generated text -> the part a record keeps
    same: Callable[[str, str], bool]                      # (prediction, gold) -> right?
    has_answer_line: bool                                 # targets end with answer_line(gold)
    lists_choices: bool                                   # the prompt lists lettered choices
    teacher_shape: str                                    # how the teacher must write the answer
    teacher_gold: Callable[[str, list[str] | None], str]  # (gold, choices) -> gold as the teacher writes it
    wrong_answer: Callable[[str, random.Random], str]     # a plausible wrong answer (offline teacher)

    def teacher_instruction(self) -> str:
        return f"End with the sentence {self.teacher_shape}"

    def answer_only_target(self, gold: str) -> str:
        return f"({gold})" if self.lists_choices else gold


KINDS: dict[str, AnswerKind] = {k.name: k for k in [
    AnswerKind("math", extract_number, clean_math, _same_number, has_answer_line=True, lists_choices=False,
               teacher_shape=f'"{final_sentence("<number>")}" using the number only.',
               teacher_gold=lambda gold, choices: gold, wrong_answer=_wrong_number),
    AnswerKind("yesno", extract_yesno, clean_yesno, _same_text, has_answer_line=True, lists_choices=False,
               teacher_shape=f'"{final_sentence("yes")}" or "{final_sentence("no")}"',
               teacher_gold=lambda gold, choices: gold.lower(),
               wrong_answer=lambda gold, rng: "no" if gold.lower() == "yes" else "yes"),
    AnswerKind("choice", extract_choice, clean_choice, _same_text, has_answer_line=False, lists_choices=True,
               teacher_shape=f'"{final_sentence("<choice text> (<letter>)")}"',
               teacher_gold=_choice_gold, wrong_answer=lambda gold, rng: gold + "0"),
]}
