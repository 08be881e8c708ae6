"""The teacher's prompts: one place, versioned by a hash of their text.

Two request kinds: `annotate` (question + gold answer -> a rationale) and `feedback`
(question + the student's wrong rationale + gold answer -> a correct rationale that deals
with that mistake). The wording is our own. Any edit here changes `template_hash`, which
goes into every request key, so a re-run after an edit asks the teacher again instead of
reusing answers to the old prompt. The hash covers one task kind's final sentence, so adding or
editing another kind leaves the keys of journals already paid for as they were.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from answers import CHOICE_LETTERS, KINDS
from tasks import Example, TaskSpec

SYSTEM = (
    "You are a patient teacher who writes short, correct worked solutions for a student model. "
    "Write one paragraph of plain prose, with no lists, headings or line breaks."
)


def final_sentence_instruction(task_kind: str) -> str:
    """How the last sentence must look for this task kind (SPEC §2; answers.KINDS): the student learns this exact shape."""
    return KINDS[task_kind].teacher_instruction()


ANNOTATE = """Solve the question below step by step. Show each calculation or fact you use, then state the result.
{final_sentence}

Question: {question}{choices}
Correct answer: {answer}

Write the reasoning that leads to the correct answer."""

# A feedback reply is the critique of the student's attempt, this marker, then the corrected solution. Only the
# solution becomes training data (`split_feedback`): the student is trained on the question alone, and a
# critique in its target taught it to open every answer by finding fault with an attempt it was never shown.
SOLUTION_MARKER = "Correct solution:"
_SOLUTION_MARKER = re.compile(r"correct solution\s*:", re.IGNORECASE)

FEEDBACK = """A student tried the question below and went wrong. Read the student's attempt, find its first \
mistake, and say in one sentence what was wrong and what it should have been. Then write "Correct solution:" and \
solve the question correctly step by step, in the same paragraph, without referring to the student's attempt.
{final_sentence}

Question: {question}{choices}
Student's attempt: {wrong}
Correct answer: {answer}

Write your reply as one paragraph."""

TEMPLATES = {"annotate": ANNOTATE, "feedback": FEEDBACK}


def split_feedback(text: str) -> tuple[str, str | None]:
    """(critique, solution) of a feedback reply, split at the first SOLUTION_MARKER; solution None without one."""
    found = _SOLUTION_MARKER.search(text)
    if found is None:
        return text.strip(), None
    return text[:found.start()].strip(), text[found.end():].strip()


@dataclass(frozen=True)
class Prompt:
    kind: str
    messages: list[dict]
    template_hash: str


# The kinds whose final sentences were hashed together before each kind had its own hash: they keep that
# joint hash, so the journals their requests are keyed in stay valid. A kind added later hashes its own alone.
JOINTLY_HASHED_KINDS = ("math", "yesno", "choice")


def final_sentences_hashed(task_kind: str) -> list[str]:
    kinds = JOINTLY_HASHED_KINDS if task_kind in JOINTLY_HASHED_KINDS else (task_kind,)
    return [final_sentence_instruction(k) for k in kinds]


def template_hash(kind: str, task_kind: str) -> str:
    """Short sha256 of everything that shapes the prompt of this request kind for tasks of this answer kind."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown request kind {kind!r}")
    text = "\n---\n".join([SYSTEM, *final_sentences_hashed(task_kind), TEMPLATES[kind]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def gold_text(task: TaskSpec, ex: Example) -> str:
    """The gold answer as the teacher should write it: cqa as '<text> (<letter>)'."""
    return task.answers.teacher_gold(ex.gold, ex.choices)


def _choices_block(task: TaskSpec, ex: Example) -> str:
    if not task.answers.lists_choices or not ex.choices:
        return ""
    return "\nAnswer Choices: " + " ".join(f"({letter}) {text}" for letter, text in zip(CHOICE_LETTERS, ex.choices))


def render(kind: str, task: TaskSpec, ex: Example, wrong: str | None = None) -> Prompt:
    if kind not in TEMPLATES:
        raise ValueError(f"unknown request kind {kind!r}")
    user = TEMPLATES[kind].format(final_sentence=final_sentence_instruction(task.kind), question=ex.question,
                                  choices=_choices_block(task, ex), answer=gold_text(task, ex),
                                  wrong=" ".join((wrong or "").split()))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return Prompt(kind, messages, template_hash(kind, task.kind))
