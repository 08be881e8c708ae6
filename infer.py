"""Evaluate a student: greedy decoding on a split, accuracy of the extracted final answer.

    python infer.py --task gsm8k --test_on test --device 0,1,2,3,4,5,6,7 --fewshot --rationale \
        --checkpoint checkpoints/student_train/saved_ckpt_path
Writes <output_dir>/Acc<acc>.json (args, correct, total, acc, strict_acc, one record per item).
"""
from __future__ import annotations

import os
from pathlib import Path

import distributed
from args import InferArguments, as_dict
from common import atomic_write_json, read_json, redact, set_seed
from generation import SamplingConfig, evaluate, load_model, looks_local, torch_dtype
from tasks import get_task, load_demos, load_split


def default_output_dir(args, stage: str) -> str:
    """<checkpoint>/<stage>_<split>[_<note>], or outputs/<hub name>/... for a hub model."""
    base = args.model_path if looks_local(args.model_path) else os.path.join("outputs", args.model_path.replace("/", "_"))
    return os.path.join(base, f"{stage}_{args.test_on}" + (f"_{args.note}" if args.note else ""))


def demos_for(args, task) -> str:
    """Few-shot demos (drawn from the train split unless a file is given), or '' without --fewshot."""
    if not args.fewshot:
        return ""
    train = None if args.fewshot_file else load_split(task.name, "train", args.data_dir, valid_size=args.valid_size)
    return load_demos(task, args.rationale, args.fewshot_file, train, args.seed)


def setup(args):
    """Task, examples of --test_on, demos, and the model on this process's device."""
    set_seed(args.seed)
    task = get_task(args.task)
    examples = load_split(task.name, args.test_on, args.data_dir, args.limit, args.valid_size)
    demos = demos_for(args, task)
    model, tokenizer = load_model(args.model_path, torch_dtype(args.fp16, args.bf16), args.trust_remote_code,
                                  flag="--checkpoint" if args.checkpoint else "--load")
    model.to(distributed.device())
    return task, examples, demos, model, tokenizer


def run(args: InferArguments) -> dict | None:
    """Evaluate and write Acc<acc>.json; returns the result on rank 0 (None elsewhere)."""
    task, examples, demos, model, tokenizer = setup(args)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens or task.max_new_tokens, batch_size=args.batch)
    result = evaluate(model, tokenizer, task, examples, demos, args.rationale, cfg, desc=f"eval {task.name}/{args.test_on}")
    if result is None:
        return None
    output_dir = Path(args.output_dir or default_output_dir(args, "eval"))
    result = {"args": redact(as_dict(args)), **result}
    path = output_dir / f"Acc{result['acc']:.4f}.json"
    atomic_write_json(path, result)
    result["path"] = str(path)
    print(f"{task.name}/{args.test_on}: accuracy {result['acc']:.4f} ({result['correct']}/{result['total']}), "
          f"strict {result['strict_acc']:.4f} ({result['strict_correct']}/{result['total']})  -> {path}")
    return result


def read_result(out: Path) -> dict | None:
    """The newest Acc<acc>.json in `out` in brief (None if there is none): the round driver reads this."""
    files = sorted(out.glob("Acc*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    result = read_json(files[-1])
    return {"acc": result["acc"], "strict_acc": result["strict_acc"], "correct": result["correct"],
            "total": result["total"], "file": str(files[-1])}


main = distributed.script_main(InferArguments, run)

if __name__ == "__main__":
    main()
