"""How often a student's first generated token is a lone digit on few-shot rationale prompts.

The original's prompts ended in "Reasoning: ", leaving a lone space token at the boundary; byte-level
BPE tokenizers use a lone space almost only before digits, so a pretrained model then started its
answer with a digit (16 of 16 gsm_symbolic validation prompts with SmolLM2-135M-Instruct). Prompts
now end at the colon and the space opens the answer's first word (tasks.BOUNDARY). This measures
the rate (issue "Real students", item 1; results in README "Bring your own student").

    python experiments/first_token.py --load checkpoints/smollm2-135m-instruct --task gsm_symbolic --n 16
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from args import InferArguments  # noqa: E402
from flags import parse  # noqa: E402
from infer import demos_for  # noqa: E402
from model_loading import load_model  # noqa: E402
from tasks import build_prompt, get_task, load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--task", default="gsm_symbolic")
    p.add_argument("--data_dir", default="localdataset")
    p.add_argument("--split", default="validation")
    p.add_argument("--n", type=int, default=16)
    args = p.parse_args()
    infer_args = parse(InferArguments, ["--task", args.task, "--data_dir", args.data_dir, "--fewshot", "--load", args.load])
    task = get_task(args.task)
    demos = demos_for(infer_args, task)
    model, tokenizer = load_model(args.load)
    digit = 0
    for ex in load_split(task.name, args.split, args.data_dir, args.n):
        prompt = build_prompt(task, ex, demos, rationale=True)
        encoded = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**encoded, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             begin_suppress_tokens=list(tokenizer.all_special_ids))
        first = tokenizer.convert_ids_to_tokens(int(out[0, -1]))
        last = tokenizer.convert_ids_to_tokens(int(encoded["input_ids"][0, -1]))
        is_digit = bool(re.fullmatch(r"\d+", tokenizer.decode(out[0, -1:])))
        digit += is_digit
        print(f"prompt ends {last!r:>10}  first token {first!r:>12}  lone digit: {is_digit}")
    print(f"\nfirst token a lone digit: {digit}/{args.n}")


if __name__ == "__main__":
    main()
