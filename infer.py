"""Evaluate a student: greedy decoding on a split, accuracy of the extracted final answer.

    python infer.py --task gsm8k --test_on test --device 0,1,2,3,4,5,6,7 --fewshot --rationale \
        --checkpoint checkpoints/student_train/saved_ckpt_path
Writes <output_dir>/Acc<acc>.json in the original's layout (acc in percent; args, correct, total,
results, gen_config) with our additions beside it (accuracy as a fraction, the strict score, the
raw generation of each item).

STaR rationalisation (`--hint --hint_filter_path Acc*.json --fewshot --rationale`): only the
questions that file marks wrong, each prompt block with a line naming its answer.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import distributed
from args import InferArguments
from common import UserError, atomic_write_json, check_output_dir, looks_local, read_json, redact, set_seed
from flags import as_dict
from tasks import add_hints, build_prompt, get_task, load_demos, load_split

if TYPE_CHECKING:  # torch is imported after the flags are checked
    import torch


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


def inference_dtype(args) -> torch.dtype | None:
    """--fp16/--bf16 as given; with --fp16 unset, the original's float16 where it can serve (a GPU, no --bf16)."""
    import torch

    from model_loading import torch_dtype
    if args.fp16 is not None:
        return torch_dtype(args.fp16, args.bf16)
    reason = "with --bf16: bfloat16" if args.bf16 else "on CPU: float32" if distributed.device().type == "cpu" else None
    if reason is None:
        return torch.float16
    if distributed.is_main():
        print(f"note: --fp16 default ignored {reason}")
    return torch_dtype(False, args.bf16)


ORIGINAL_LOAD = "EleutherAI/gpt-j-6B"  # the original's default --load for evaluation and the exam


def base_model(args) -> str:
    """--load as given; left at our default (the embedded student) next to a --checkpoint, the
    original's default (GPT-J-6B), whose tokenizer its checkpoints (saved without one) need. Ours
    carry their tokenizer and never ask."""
    return ORIGINAL_LOAD if args.load == InferArguments.load else args.load


def setup(args, keep: set[str] | None = None):
    """Task, examples of --test_on (only the questions in `keep` when given, before --limit), demos,
    and the model on this process's device."""
    set_seed(args.seed)
    task = get_task(args.task)
    examples = load_split(task.name, args.test_on, args.data_dir, args.limit if keep is None else None, args.valid_size)
    if keep is not None:
        examples = [ex for ex in examples if ex.question in keep][:args.limit or None]
        if not examples:
            raise UserError(f"--hint_filter_path: none of its wrong questions is in split {args.test_on} of {task.name}")
    demos = demos_for(args, task)
    from generation import engine_class  # torch and transformers: after the flags and inputs are checked

    model, tokenizer = engine_class(args.engine).load(
        args.model_path, inference_dtype(args), flag="--checkpoint" if args.checkpoint else "--load",
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        tokenizer_fallback=base_model(args) if args.checkpoint else None, seed=args.seed, prefix_cache=args.prefix_cache)
    return task, examples, demos, model, tokenizer


def wrong_questions(path: str) -> set[str]:
    """The questions an Acc*.json marks wrong (its `results`, `correct` false): what --hint re-asks."""
    if not Path(path).is_file():
        raise UserError(f"--hint_filter_path: {path} not found")
    try:
        data = read_json(path)
    except UserError as err:
        raise UserError(f"--hint_filter_path: {err}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "question" in r and "correct" in r for r in results):
        raise UserError(f"--hint_filter_path: {path} is not an Acc*.json of infer.py "
                        f"(needs a 'results' list of items with 'question' and 'correct')")
    return {r["question"] for r in results if not r["correct"]}


def acc_file(args, task, examples, result: dict, gen_config: dict) -> dict:
    """The original's Acc file (acc in percent; per item question, answer, final_ans, the cleaned
    generation, pred, correct), then ours: fractions, the strict score, the raw generation."""
    results = [{"question": ex.question, "answer": ex.rationale or ex.gold, "final_ans": ex.gold,
                "generated": task.answers.clean(record["generated"]), "pred": record["prediction"],
                "correct": record["correct"], "strict_prediction": record["strict_prediction"],
                "strict_correct": record["strict_correct"], "raw_generated": record["generated"]}
               for ex, record in zip(examples, result["records"])]
    return {"args": redact(as_dict(args)), "correct": result["correct"], "total": result["total"],
            "acc": result["acc"] * 100, "results": results, "gen_config": gen_config,
            "accuracy": result["acc"], "strict_accuracy": result["strict_acc"], "strict_correct": result["strict_correct"]}


def add_votes(output: dict, summary: dict, outputs: list[list[str]], sampling_config: dict) -> dict:
    """Each result item gets its samples and their vote; the file gets maj@k and pass@k (returned)."""
    for item, texts, item_vote in zip(output["results"], outputs, summary.pop("votes")):
        item["samples"] = texts
        item["sample_predictions"] = item_vote["predictions"]
        item["majority_prediction"] = item_vote["majority"]
        item["majority_correct"] = item_vote["majority_correct"]
    return {**summary, "gen_config": sampling_config}


def run(args: InferArguments) -> dict | None:
    """Evaluate and write Acc<acc>.json; returns the file's content on rank 0 (None elsewhere)."""
    out = Path(args.output_dir or default_output_dir(args, "eval"))
    check_output_dir(out, "--output_dir")
    keep = wrong_questions(args.hint_filter_path) if args.hint else None
    task, examples, demos, model, tokenizer = setup(args, keep)
    from generation import SamplingConfig, evaluate, gen_config, generate, self_consistency

    prompts = [build_prompt(task, ex, demos, args.rationale) for ex in examples]
    if args.hint:
        prompts = [add_hints(task, prompt, ex.gold) for prompt, ex in zip(prompts, examples)]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens or task.max_new_tokens, batch_size=args.batch,
                         suppress_special_first=args.decode_eos_token, prefix_cache=args.prefix_cache,
                         engine=args.engine)
    result = evaluate(model, tokenizer, task, examples, demos, args.rationale, cfg,
                      desc=f"eval {task.name}/{args.test_on}", prompts=prompts)
    if result is None:
        return None
    output = acc_file(args, task, examples, result, gen_config(tokenizer, cfg))
    sampled = ""
    if args.self_consistency:
        sampling = replace(cfg, do_sample=True, num_samples=args.self_consistency, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)
        outputs = generate(model, tokenizer, prompts, sampling, desc=f"maj@{args.self_consistency} {task.name}/{args.test_on}")
        if outputs is None:
            return None
        output["self_consistency"] = add_votes(output, self_consistency(task, examples, outputs, args.rationale),
                                               outputs, gen_config(tokenizer, sampling))
        k = args.self_consistency
        sampled = f", maj@{k} {output['self_consistency'][f'maj@{k}']:.4f}, pass@{k} {output['self_consistency'][f'pass@{k}']:.4f}"
    path = out / f"Acc{output['acc']:.4f}.json"
    atomic_write_json(path, output)
    print(f"{task.name}/{args.test_on}: accuracy {result['acc']:.4f} ({result['correct']}/{result['total']}), "
          f"strict {result['strict_acc']:.4f} ({result['strict_correct']}/{result['total']}){sampled}  -> {path}")
    return {**output, "path": str(path)}


main = distributed.script_main(InferArguments, "infer:run")

if __name__ == "__main__":
    main()
