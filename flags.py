"""How flags become dataclasses and back: the parser (one `error:` line for argparse's own errors), bounds and
choices checked the same way for every script, a script's own defaults for shared flags, and command lines
rebuilt from a dataclass (the drivers' stage commands). The dataclasses themselves are args.py's.

Boolean flags accept both the bare form (`--fewshot`) and a value (`--fewshot yes|no`), as the
original README uses both.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args, get_type_hints

from transformers import HfArgumentParser

from common import UserError


class OneLineParser(HfArgumentParser):
    """argparse's own errors (unknown flag, bad choice, not a number) as the one `error:` line every
    other bad input gets, instead of the usage block."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def check_one_value_each(parser: HfArgumentParser, argv: list[str]) -> None:
    """A setting given under two of its names (--limit and the original's --sample_num, --lr and --learning_rate)
    with different values: argparse would keep the last one silently; it is a contradiction. The same name
    given twice keeps argparse's rule (the last one wins), which scripts that add flags to a command rely on."""
    dest_of = {option: action.dest for action in parser._actions for option in action.option_strings
               if action.dest != "help"}
    last_given: dict[str, tuple[str, str]] = {}  # setting -> (the flag that gave it last, its value)
    for i, arg in enumerate(argv):
        flag, has_value, value = arg.partition("=")
        if flag not in dest_of:
            continue
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        earlier_flag, earlier_value = last_given.get(dest_of[flag], (flag, value))
        last_given[dest_of[flag]] = (flag, value)
        if value != earlier_value and earlier_flag.replace("-", "_") != flag.replace("-", "_"):
            raise UserError(f"{earlier_flag} {earlier_value} and {flag} {value}: one value for the same setting, please")


def parse(cls, argv: list[str] | None = None):
    parser = OneLineParser(cls)
    check_one_value_each(parser, sys.argv[1:] if argv is None else argv)
    try:
        (parsed,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # raised by __post_init__ checks
        raise UserError(str(err)) from None
    check_bounds(parsed)
    return parsed


def bounds_of(cls) -> dict[str, str]:
    """The BOUNDS of the class and of every group it is composed of (each group bounds its own fields)."""
    bounds: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        bounds |= vars(klass).get("BOUNDS", {})
    return bounds


def check_bounds(args) -> None:
    """Each field named in BOUNDS ({name: ">=1" | ">0" | ...}) holds a finite number in range
    (None is left alone: it means "not set"). Kept as a table so every script rejects nonsense the same way."""
    by_name = {f.name: f for f in fields(args)}
    for name, bound in bounds_of(type(args)).items():
        value = getattr(args, name)
        if value is None:
            continue
        op, limit = bound[:2] if bound[1] == "=" else bound[:1], float(bound.lstrip("<>="))
        ok = isinstance(value, (int, float)) and math.isfinite(value) and \
            {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
        if not ok:
            flag = "/".join(flags_of(by_name[name]))
            raise UserError(f"{flag} must be a number {op} {bound.lstrip('<>=')}, got {value}")


@functools.cache
def choices(cls) -> dict[str, tuple[str, ...]]:
    """{field: the values it allows} for the fields typed `Literal[...]` (argparse offers them as choices)."""
    hints = get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if getattr(hints[f.name], "__origin__", None) is Literal}


def check_choices(args) -> None:
    """Literal-typed fields hold one of their values: argparse checks flags, this checks a dataclass built
    directly (the round driver builds each stage's, to_argv)."""
    for name, allowed in choices(type(args)).items():
        if getattr(args, name) not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")


def script_defaults(**defaults):
    """Class decorator in place of @dataclass: this script's own defaults for flags declared once in the groups
    it is composed of, which keep their type, bounds and help. A value (default, note) adds why to the help."""
    def build(cls):
        declared = {f.name: (f, base) for base in reversed(cls.__mro__[1:]) if hasattr(base, "__dataclass_fields__")
                    for f in fields(base)}
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            default, note = value if isinstance(value, tuple) else (value, "")
            inherited, owner = declared[name]
            metadata = dict(inherited.metadata)
            if note:
                metadata["help"] = f"{metadata.get('help', '')} {note}".strip()
            setattr(cls, name, field(default=default, metadata=metadata))
            annotations[name] = get_type_hints(owner)[name]  # resolved where declared: this module may not know its name
        cls.__annotations__ = annotations
        return dataclass(cls)
    return build


def as_dict(args) -> dict:
    return asdict(args)


def to_argv(cls, **values) -> list[str]:
    """Command-line flags that parse back into `cls(**values)`. Building `cls` here checks every name
    and value before anything runs; each flag is written under its first alias (the original's short
    flag) where it has one; None values are left out."""
    cls(**values)
    argv = []
    for f in fields(cls):
        value = values.get(f.name)
        if value is None:
            continue
        flag = (f.metadata.get("aliases") or [f"--{f.name}"])[0]
        argv += [flag, ("yes" if value else "no") if isinstance(value, bool) else str(value)]
    return argv


def flags_of(f) -> list[str]:
    return [f"--{f.name}", *f.metadata.get("aliases", [])]


def differing_defaults(args, original: dict, argv: list[str]) -> list[str]:
    """'--flag ours (original: theirs)' for every field in `original` left at our default (not on the
    command line `argv`) where the original's default was different: printed so no one is surprised."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    notes = []
    for f in fields(args):
        if f.name in original and not given & set(flags_of(f)) and getattr(args, f.name) != original[f.name]:
            show = lambda v: ("yes" if v else "no") if isinstance(v, bool) else v  # noqa: E731
            notes.append(f"{flags_of(f)[-1]} {show(getattr(args, f.name))} (original: {show(original[f.name])})")
    return notes


def device_list(device: str) -> list[str]:
    """'0,1,2' -> ['0','1','2']; 'cpu' or '' -> [] (one process, default device)."""
    if device.strip().lower() in ("", "cpu", "auto"):
        return []
    items = [d.strip() for d in device.split(",") if d.strip()]
    if not all(d.isdigit() for d in items):
        raise UserError(f"--device: expected 'cpu' or comma-separated GPU ids like 0,1,2, got {device!r}")
    return items


def optimizer_names() -> set[str]:
    from transformers.training_args import OptimizerNames  # imports torch: only when --optim is given

    return {o.value for o in OptimizerNames}


def check_task(name: str) -> None:
    """--task names a task of tasks.TASKS: checked with the flags, before any model code is imported."""
    from tasks import get_task

    get_task(name)
