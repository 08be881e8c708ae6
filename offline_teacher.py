"""The offline teacher: a stand-in for an LLM teacher on datasets with gold rationales (wordmath, gsm_symbolic),
behind the same `complete(request) -> Reply` interface as the OpenAI-compatible backend (teacher_backends.py).
The step arithmetic it checks attempts with (`parse_equations`, `first_wrong_step`), the critique (`diagnose`),
the tailored solution (`correction_point`, `tailored_solution`) and the slips (`slip`); `OfflineTeacher` says
what it can and cannot stand in for."""
from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass, field

import tasks
from answers import CLOSING_FINAL_SENTENCE, FINAL_PREFIX, final_sentence, format_number, numbers_close
from tasks import TaskSpec
from teacher_journal import OFFLINE_MODEL, Reply, Request, estimate_tokens, prompt_text
from teacher_templates import SOLUTION_MARKER, gold_text, split_feedback
from wordmath import CONNECTORS, STEP_BY_STEP

# ---- offline teacher: correct rationales from the dataset's gold solution

_CURRENCY = "$£€"
_NUM = rf"[{_CURRENCY}]?\d+(?:\.\d+)?"
_OP = r"[-+*/x×÷]"
_EQUATION = re.compile(rf"(?<![\w.])({_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*=\s*(-?{_NUM})")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_EVAL_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _plain(number: str) -> str:
    return number.translate({ord(c): None for c in _CURRENCY})


@dataclass(frozen=True)
class Equation:
    lhs: str        # "7 + 5", as the student wrote the operands and operators
    claimed: float  # what the text says the lhs equals
    first: str      # first operand, for "should start from"
    # where it stands in the text it was read from: [start, end) of the whole equation, and
    # [result_start, end) of the result as written (not part of equality)
    start: int = field(default=-1, compare=False, repr=False)
    end: int = field(default=-1, compare=False, repr=False)
    result_start: int = field(default=-1, compare=False, repr=False)

    @property
    def value(self) -> float | None:
        return _evaluate(self.lhs)

    @property
    def checks(self) -> bool:
        """Its arithmetic is right."""
        return numbers_close(self.claimed, self.value)

    def __str__(self) -> str:
        return f"{self.lhs} = {format_number(self.claimed)}"


def _evaluate(lhs: str) -> float | None:
    expr = _plain(lhs).replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        return _eval_node(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, KeyError, TypeError):
        return None


def _eval_node(node) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp):
        return _EVAL_OPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    raise TypeError("not arithmetic")


def parse_equations(text: str) -> list[Equation]:
    """Every `a op b [op c ...] = r` in the text, in order (commas in numbers ignored), with its
    position in `text` as written."""
    flat = _THOUSANDS.sub("", text)
    at = [i for i, ch in enumerate(text) if not (ch == "," and _THOUSANDS.match(text, i))] + [len(text)]
    found = []
    for match in _EQUATION.finditer(flat):
        tokens = re.findall(rf"{_NUM}|{_OP}", match.group(1))
        claimed = float(_plain(match.group(2)))
        found.append(Equation(" ".join(tokens), claimed, _plain(tokens[0]), start=at[match.start()],
                              end=at[match.end() - 1] + 1, result_start=at[match.start(2)]))
    return found


def first_wrong_step(student: list[Equation], reference: list[Equation]) -> int | None:
    """Index of the student's first step whose arithmetic is wrong or whose result is not the gold's
    step at the same position; None when every step checks out (there may be too few or too many)."""
    for i, step in enumerate(student):
        if step.value is not None and not step.checks:
            return i
        if i < len(reference) and not numbers_close(step.claimed, reference[i].claimed):
            return i
    return None


def diagnose(wrong: str, gold_rationale: str, task: TaskSpec, gold: str) -> str:
    """One sentence naming the student's first wrong step (by arithmetic, then against the gold steps)."""
    student, reference = parse_equations(wrong), parse_equations(gold_rationale)
    i = first_wrong_step(student, reference)
    if i is not None:
        step = student[i]
        if step.value is not None and not step.checks:
            return f"The step {step} is wrong: {step.lhs} = {format_number(step.value)}."
        right = reference[i]
        if step.first != right.first:
            return f"The step {step} should start from {right.first}: {right}."
        return f"The step {step} is wrong: it should be {right}."
    predicted = tasks.extract_answer(task, wrong)
    shown = f" {predicted}" if predicted is not None else ""
    if len(student) > len(reference) > 0:
        return f"The step {student[len(reference)]} is not needed: the answer is reached after {reference[-1]}."
    if student:
        return f"The steps shown are right, but they stop too early, so the final answer{shown} is wrong."
    return f"The final answer{shown} is wrong; the correct answer is {gold}."


OPENERS = ["", STEP_BY_STEP]


_CONNECTOR = re.compile("|".join(re.escape(c) for c in CONNECTORS))
_FULL_STOP = re.compile(r"[.!?](?=\s|$)")
_NEXT_CAPITAL = re.compile(r"\s+(?=[A-Z])")  # GSM lines folded into one paragraph lose their full stops
_FINAL_PREFIX = re.compile(re.escape(FINAL_PREFIX), re.IGNORECASE)


def _rephrase(body: str, connector: str, rng: random.Random) -> str:
    """The gold steps in another wording: the first step keeps `connector`, later ones are re-drawn,
    and the gold's own closing sentence gives way to ours."""
    body = CLOSING_FINAL_SENTENCE.sub("", body)
    for opener in OPENERS:
        if opener and body.startswith(opener):
            body = body[len(opener):].lstrip()
    picks = iter([connector] + [rng.choice(CONNECTORS) for _ in range(len(_CONNECTOR.findall(body)))])
    return _CONNECTOR.sub(lambda _: next(picks), body)


def _sentence_end(text: str, after: int, before: int) -> int | None:
    """Where the sentence holding text[after - 1] ends: its full stop, or else (an unpunctuated GSM
    line) the space before the next capitalised word, or the end of the text; None when that is
    not at or before `before` (the next equation's start), i.e. the sentence also holds that one."""
    stop = _FULL_STOP.search(text, after)
    if stop and stop.end() <= before:
        return stop.end()
    gap = _NEXT_CAPITAL.search(text, after)
    if gap and gap.end() <= before:
        return gap.start()
    return len(text) if before >= len(text) else None


def correction_point(wrong: str, gold_rationale: str) -> tuple[str, str]:
    """(the student's sentences to keep, the gold's text to continue with).

    Kept: the student's sentences up to and including the last of its steps before the first wrong
    one (`first_wrong_step`); the gold goes on from the sentence after its own step at that position.
    Backs off a step where a sentence boundary is missing (two steps in one sentence) or the kept
    text holds a final sentence; ("", whole gold) when the first step is wrong or nothing checks out.
    The result's equations are verified: the kept steps check out and are the gold's, and the ones
    after are the gold's."""
    wrong, gold_rationale = tasks.fold(wrong), tasks.fold(gold_rationale)
    student, reference = parse_equations(wrong), parse_equations(gold_rationale)
    first_wrong = first_wrong_step(student, reference)
    k = min(len(student) if first_wrong is None else first_wrong, len(reference))
    for kept in range(k, 0, -1):
        cut = _sentence_end(wrong, student[kept - 1].end,
                            student[kept].start if kept < len(student) else len(wrong))
        resume = _sentence_end(gold_rationale, reference[kept - 1].end,
                               reference[kept].start if kept < len(reference) else len(gold_rationale))
        if cut is None or resume is None:
            continue
        prefix, tail = wrong[:cut].strip(), gold_rationale[resume:].strip()
        if _FINAL_PREFIX.search(prefix) or split_feedback(prefix)[1] is not None:
            continue
        if not prefix.endswith((".", "!", "?")):
            prefix += "."
        steps = parse_equations(f"{prefix} {tail}")
        if (all(s.checks for s in steps[:kept]) and steps[:kept] == student[:kept]
                and steps[kept:] == reference[kept:]):
            return prefix, tail
    return "", gold_rationale


def _solution_body(kept: str, tail: str, opener: str, connector: str, rng: random.Random) -> str:
    """The kept student text (or, with none kept, an opener), then the gold's tail re-worded."""
    return " ".join(p for p in [kept or opener, _rephrase(tail, connector, rng)] if p)


def tailored_solution(wrong: str, gold_rationale: str, answer: str, rng: random.Random,
                      connector: str | None = None, opener: str = "") -> str:
    """The solution a teacher correcting this attempt writes: the student's own sentences up to its
    last step that checks out, then the gold's steps from the corrected one on (re-worded as
    `_rephrase` does), then the final sentence. The whole gold re-worded when nothing is kept
    (`opener` starts it then)."""
    kept, tail = correction_point(wrong, gold_rationale)
    body = _solution_body(kept, tail, opener, connector or rng.choice(CONNECTORS), rng)
    return f"{body} {final_sentence(answer)}".strip()


def slip(body: str, gold: str, wrong_answer: str) -> str:
    """A teacher's slip: the last equation's result becomes `wrong_answer` (the final sentence that
    follows then says the same), where that result was the gold; otherwise the text is unchanged."""
    steps = parse_equations(body)
    try:
        gold_value = float(gold)
    except ValueError:
        return body
    if not steps or not numbers_close(steps[-1].claimed, gold_value):
        return body
    last = steps[-1]
    written = body[last.result_start:last.end]
    symbol = "".join(c for c in written if c in _CURRENCY)
    return body[:last.result_start] + symbol + wrong_answer + body[last.end:]


def _variants() -> list[tuple[str, str]]:
    return [(opener, conn) for conn in CONNECTORS for opener in OPENERS]


class OfflineTeacher:
    """Deterministic teacher for datasets with gold rationales (wordmath, gsm_symbolic), built from
    those rationales: it knows only the steps the dataset writes down.

    It stands in for: the backend interface, cost accounting (estimated tokens) and journaling;
    n distinct phrasings per request (the triplet loss needs a second positive); feedback that
    names the student's first checkable wrong step (`diagnose`) and whose solution keeps the
    student's steps before it and corrects from there (`tailored_solution`); and teacher errors at
    a set rate (`error_rate`, per rationale: the last step's result and the final answer both wrong,
    `slip`), which only the gold-answer filter catches.

    It cannot stand in for: a real LLM's knowledge (without a gold rationale it has nothing),
    novel reasoning or explanations beyond the steps the dataset has (it re-words connectors only),
    corrections of steps it cannot parse (no `a op b = c`: the whole gold is the solution), or
    errors correlated with a question's difficulty (its slips are drawn at one rate, independently
    of the question)."""

    name = "offline"
    model = OFFLINE_MODEL
    # in params(), so in the request key: journals of an earlier behaviour do not answer this one
    VERSION = 2  # 2: tailored solutions, consistent slips

    def __init__(self, task: TaskSpec, n: int, error_rate: float, seed: int):
        self.task, self._n, self._error_rate, self._seed = task, n, error_rate, seed

    def params(self) -> dict:
        return {"n": self._n, "error_rate": self._error_rate, "seed": self._seed, "v": self.VERSION}

    async def complete(self, request: Request) -> Reply:
        return self.answer(request)

    def answer(self, request: Request) -> Reply:
        rng = random.Random(request.key)  # the key already holds seed and params
        ex = request.example
        gold_rationale = tasks.fold(ex.rationale or "")
        critique, kept, tail = "", "", gold_rationale
        if request.kind == "feedback":  # the critique, then the solution (as FEEDBACK asks a real teacher)
            critique = f"{diagnose(request.wrong or '', gold_rationale, self.task, ex.gold)} {SOLUTION_MARKER}"
            kept, tail = correction_point(request.wrong or "", gold_rationale)
        pool = [("", conn) for conn in CONNECTORS] if kept else _variants()  # the student's text opens it
        picks = rng.sample(range(len(pool)), min(self._n, len(pool)))
        picks += [rng.randrange(len(pool)) for _ in range(self._n - len(picks))]
        texts = []
        for i in picks:
            opener, connector = pool[i]
            body = _solution_body(kept, tail, opener, connector, rng)
            answer = gold_text(self.task, ex)
            if rng.random() < self._error_rate:
                answer = self.task.answers.wrong_answer(ex.gold, rng)
                body = slip(body, ex.gold, answer)
            texts.append(" ".join(p for p in [critique, body, final_sentence(answer)] if p))
        completion = sum(estimate_tokens(t) for t in texts)
        return Reply(texts, estimate_tokens(prompt_text(request.prompt)), completion)
