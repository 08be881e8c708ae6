"""The exam: the student samples several answers per question; its mistakes become next round's inputs.

    python infer_student_wrong.py --task gsm8k --rationale --fewshot --batch 4 --test_on train \
        --note round1 --device 0,1,2,3,4,5,6,7 --checkpoint checkpoints/student_train/saved_ckpt_path
Writes, in --output_dir: student_wrong.json ({question: [unique wrong rationale, ...]}, questions
answered right in every sample absent; each rationale cleaned as the original did: cut just after the
answer it gives), samples.jsonl (every sample, raw and cleaned) and summary.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import distributed
from args import ExamArguments
from common import atomic_write_json, atomic_write_jsonl, check_output_dir, redact
from flags import as_dict
from infer import default_output_dir, setup
from tasks import build_prompt, grade


def collect_mistakes(task, examples, outputs: list[list[str]], rationale: bool):
    """Per-sample records, and {question: [unique wrong rationale, cleaned]} in first-seen order."""
    samples, wrong = [], {}
    for ex, texts in zip(examples, outputs):
        for k, text in enumerate(texts):
            graded = grade(task, text, ex.gold, rationale)
            cleaned = task.answers.clean(text)
            samples.append({"question": ex.question, "gold": ex.gold, "sample": k, "rationale": text,
                            "cleaned": cleaned, **graded})
            if not graded["correct"] and cleaned:
                bucket = wrong.setdefault(ex.question, [])
                if cleaned not in bucket:
                    bucket.append(cleaned)
    return samples, wrong


def run(args: ExamArguments) -> dict | None:
    started = time.time()
    out = Path(args.output_dir or default_output_dir(args, "exam"))
    check_output_dir(out, "--output_dir")
    task, examples, demos, model, tokenizer = setup(args)
    from generation import SamplingConfig, gen_config, generate, self_consistency  # after the flags are checked

    n_samples = args.num_return_sequences
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch, do_sample=True,
                         num_samples=n_samples, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         suppress_special_first=args.decode_eos_token, prefix_cache=args.prefix_cache,
                         engine=args.engine)
    prompts = [build_prompt(task, ex, demos, args.rationale) for ex in examples]
    outputs = generate(model, tokenizer, prompts, cfg, desc=f"exam {task.name}/{args.test_on}")
    if outputs is None:
        return None
    samples, wrong = collect_mistakes(task, examples, outputs, args.rationale)
    n = len(examples)
    per_question = [sum(s["correct"] for s in samples[i * n_samples:(i + 1) * n_samples]) for i in range(n)]
    summary = {"args": redact(as_dict(args)), "questions": n, "samples": len(samples),
               "accuracy": sum(per_question) / max(1, len(samples)),
               "strict_accuracy": sum(s["strict_correct"] for s in samples) / max(1, len(samples)),
               f"pass@{n_samples}": sum(c > 0 for c in per_question) / max(1, n),
               f"maj@{n_samples}": self_consistency(task, examples, outputs, args.rationale)[f"maj@{n_samples}"],
               "questions_with_mistakes": len(wrong), "wrong_rationales": sum(map(len, wrong.values())),
               "gen_config": gen_config(tokenizer, cfg), "seconds": round(time.time() - started, 1)}
    atomic_write_jsonl(out / "samples.jsonl", samples)
    atomic_write_json(out / "student_wrong.json", wrong)
    atomic_write_json(out / "summary.json", summary)
    print(f"exam {task.name}/{args.test_on}: {n} questions x {n_samples} samples, sample accuracy "
          f"{summary['accuracy']:.4f}, pass@{n_samples} {summary[f'pass@{n_samples}']:.4f}, "
          f"maj@{n_samples} {summary[f'maj@{n_samples}']:.4f}, "
          f"{summary['wrong_rationales']} wrong rationales on {len(wrong)} questions -> {out / 'student_wrong.json'}")
    return summary


main = distributed.script_main(ExamArguments, "infer_student_wrong:run")

if __name__ == "__main__":
    main()
