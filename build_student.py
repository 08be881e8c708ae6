"""Build the embedded round-0 student offline: tokenizer + tiny GPT-J + a short warm start.

    python build_student.py                          # checkpoints/wordmath-student
    python build_student.py --warm_steps 0 --out checkpoints/random-student
The result is a plain HF folder (model.safetensors, tokenizer.json): pass it to any script as --load.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from args import StudentArguments
from common import UserError, atomic_write_json, cli_main, set_seed
from flags import parse
from tasks import PROMPT_FORMAT, build_prompt, continuation, get_task, load_split


def warm_start_pairs(args: StudentArguments) -> list[tuple[str, str]]:
    """(prompt, continuation) of each train problem with a gold rationale: the tokenizer's corpus and the
    warm start's data."""
    task = get_task(args.task)
    train = load_split(args.task, "train", args.data_dir)
    pairs = [(build_prompt(task, ex), continuation(task, ex, ex.rationale)) for ex in train if ex.rationale]
    if not pairs:
        raise UserError(f"task {args.task}: the train split has no gold rationales to warm-start on")
    return pairs


def data_fingerprint(pairs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for prompt, target in pairs:
        digest.update(json.dumps([prompt, target]).encode())  # JSON: no two lists of pairs hash the same text
    return digest.hexdigest()


def build_settings(args: StudentArguments, pairs: list[tuple[str, str]]) -> dict:
    """What the student is a function of: the flags, the prompt format and the train text it learned from,
    so new splits from prepare_data.py rebuild it instead of reusing a student of the old ones."""
    # not the paths: the data is its fingerprint, so a copied or moved student and data folder stay "built"
    return {k: v for k, v in asdict(args).items() if k not in ("force", "out", "data_dir")} | {
        "prompt_format": PROMPT_FORMAT, "train_sha256": data_fingerprint(pairs)}


@cli_main
def main() -> None:
    args = parse(StudentArguments)
    if args.warm_steps < 0:
        raise UserError("--warm_steps must be >= 0")
    out = Path(args.out)
    info_path = out / "build_info.json"
    pairs = warm_start_pairs(args)
    settings = build_settings(args, pairs)
    if info_path.is_file() and not args.force and json.loads(info_path.read_text()).get("settings") == settings:
        print(f"{out}: student already built with these settings and train data (use --force to rebuild)")
        return
    # imported only to build: settling "already built" takes no torch
    import torch

    import student

    set_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    tokenizer = student.train_tokenizer([p + c for p, c in pairs], args.vocab_size)
    model = student.build_model(tokenizer, args.n_layer, args.n_embd, args.n_head, seed=args.seed)
    print(f"student: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    losses = student.warm_start(model, tokenizer, pairs[:args.warm_examples], args.warm_steps, args.batch_size,
                                args.lr, args.seed) if args.warm_steps else []
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    atomic_write_json(info_path, {"settings": settings, "final_loss": losses[-1] if losses else None,
                                  "seconds": round(time.time() - started, 1)})
    print(f"saved {out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
