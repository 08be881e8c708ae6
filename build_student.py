"""Build the embedded round-0 student offline: tokenizer + tiny GPT-J + a short warm start.

    python build_student.py                          # checkpoints/wordmath-student
    python build_student.py --warm_steps 0 --out checkpoints/random-student
The result is a plain HF folder (model.safetensors, tokenizer.json): pass it to any script as --load.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import student
from args import parse
from common import UserError, atomic_write_json, cli_main, set_seed
from tasks import build_prompt, continuation, get_task, load_split


@dataclass
class StudentArguments:
    task: str = field(default="wordmath", metadata={"help": "Task whose train split gives the tokenizer corpus and warm-start data."})
    data_dir: str = field(default="localdataset", metadata={"help": "Dataset root (see prepare_data.py)."})
    out: str = field(default="checkpoints/wordmath-student", metadata={"help": "Output folder."})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size."})
    n_layer: int = field(default=4, metadata={"help": "Transformer layers."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    warm_steps: int = field(default=600, metadata={"help": "Warm-start optimizer steps (0: random weights)."})
    warm_examples: int = field(default=1000, metadata={"help": "Train problems used by the warm start."})
    batch_size: int = field(default=32, metadata={"help": "Warm-start batch size."})
    lr: float = field(default=2e-3, metadata={"help": "Warm-start peak learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed for weights and batches."})
    force: bool = field(default=False, metadata={"help": "Rebuild even if --out already holds a student built with these settings."})


@cli_main
def main() -> None:
    args = parse(StudentArguments)
    out = Path(args.out)
    info_path = out / "build_info.json"
    settings = {k: v for k, v in asdict(args).items() if k != "force"}
    if info_path.is_file() and not args.force and json.loads(info_path.read_text()).get("settings") == settings:
        print(f"{out}: student already built with these settings (use --force to rebuild)")
        return
    if args.warm_steps < 0:
        raise UserError("--warm_steps must be >= 0")
    set_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    task = get_task(args.task)
    train = load_split(args.task, "train", args.data_dir)
    pairs = [(build_prompt(task, ex), continuation(task, ex, ex.rationale)) for ex in train if ex.rationale]
    if not pairs:
        raise UserError(f"task {args.task}: the train split has no gold rationales to warm-start on")
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
