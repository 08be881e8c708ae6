"""Batched generation shared by evaluation (`infer.py`), the exam and evaluation during training.

Prompts are sorted by length and cut into batches globally; batches (not items) are dealt to
ranks, so every batch, and therefore every output, is the same whatever the number of
processes. Each sequence stops at the first blank line or eos. An engine runs the batches
(`ENGINES`, chosen by --engine): `HFEngine`, the model's own `generate`, which continues every batch
from the KV cache of the tokens all prompts of a call open with (the few-shot demos; `prefix_cache.py`),
or `vllm_engine.VLLMEngine`. The prompts, their cut to the position table, the stop at a blank line and
the grading are the same whatever the engine.
"""
from __future__ import annotations

import importlib
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

import distributed
from model_loading import max_positions
from prefix_cache import build_shared_prefix, continuing_from, encode_with_prefix
from tasks import BOUNDARY, Example, TaskSpec, build_prompt, grade

STOP = "\n\n"


@dataclass
class SamplingConfig:
    max_new_tokens: int
    batch_size: int = 32
    do_sample: bool = False
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    # no special token (eos, pad) as the first new token, as the original's --decode_eos_token yes
    # (its default, also in its per-epoch evaluation): an answer never starts by ending
    suppress_special_first: bool = True
    # few-shot prompts share their demos: run them through the model once per call, not once per row
    # (off: every batch prefills whole prompts, the reference the prefix path must match)
    prefix_cache: bool = True
    engine: str = "hf"  # which of ENGINES runs the batches


def generation_settings(tokenizer, cfg: SamplingConfig) -> dict:
    """The keyword arguments HF `generate` gets (besides the tokenizer and ZeRO-3 sync): plain JSON values."""
    settings = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, stop_strings=[STOP], num_return_sequences=cfg.num_samples)
    if cfg.suppress_special_first:
        settings["begin_suppress_tokens"] = list(tokenizer.all_special_ids)
    if cfg.do_sample:
        settings.update(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k)
    else:  # the model's own generation_config may hold sampling values: greedy needs them unset
        settings.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    return settings


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids as training's prefixes (`train_data.PairEncoder`): a prompt longer than
    max_length loses its oldest tokens (demos first), never the BOS the tokenizer adds or the question."""
    return pad_left(tokenizer, encode_ids(tokenizer, prompts, max_length))


def pad_left(tokenizer, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """A batch of already-encoded prompts, left-padded (generation appends at the right edge)."""
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")


def encode_ids(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Each prompt's ids, unpadded; a prompt longer than max_length is cut on the left."""
    tokenizer.truncation_side = "left"  # a call takes padding_side but not truncation_side
    return tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]


# ---------------------------------------------------------------- engines

class Engine(Protocol):
    """What runs the batches of one `generate` call. An engine class loads its model (`load`: what
    `generate` is then given as `model`) and is made for each call, as `engine_class(cfg.engine)(model,
    tokenizer, ids, cfg, synced)`, seeing every prompt of the call (`ids`: each prompt's tokens, cut to
    `prompt_limit`); `generate` around it deals batches to ranks, cuts the texts at STOP and merges. A new
    engine is a class with these methods and an entry in ENGINES."""
    whole_share: bool  # True: it batches by itself (continuous batching), so it gets a rank's prompts at once

    @classmethod
    def load(cls, path: str, dtype, flag: str, trust_remote_code: bool, allow_pickle: bool,
             tokenizer_fallback: str | None, seed: int, prefix_cache: bool = True):
        """(model, tokenizer) for this engine, on this process's device; failures are one UserError line
        naming `flag`. prefix_cache: whether calls will reuse the prompts' shared opening."""

    @staticmethod
    def prompt_limit(model, cfg: SamplingConfig) -> int:
        """Most prompt tokens a row may keep: the rest of the position table holds the new tokens."""

    @staticmethod
    def record(tokenizer, cfg: SamplingConfig) -> dict:
        """The engine's settings for `cfg`, as the Acc file's and exam summary's `gen_config` records them."""

    def complete(self, ids: list[list[int]], cfg: SamplingConfig, seed: int, indices: list[int]) -> list[list[str]]:
        """`cfg.num_samples` texts (the new tokens, decoded) for each prompt of one batch, in order; `seed`
        is the batch's, `indices` the prompts' places in the call (an engine that seeds each request)."""


class HFEngine:
    """The model's own `generate` (the model being trained or `model_loading.load_model`'s), one call per batch.

    cfg.prefix_cache: when all prompts open with the same tokens (few-shot demos), those are run once, here,
    and every batch continues from their cache; each row's tokens are the same as without. synced: the weights
    are sharded (ZeRO-3): the shared-prefix forward runs on every rank (all ranks see all prompts, so all decide
    alike) and `generate` keeps stepping until all ranks are done."""
    whole_share = False

    def __init__(self, model, tokenizer, ids: list[list[int]], cfg: SamplingConfig, synced: bool = False):
        self.model, self.tokenizer, self.synced = model, tokenizer, synced
        # a single row has no one to share its prefill with
        self.prefix = build_shared_prefix(model, ids) if cfg.prefix_cache and len(ids) * cfg.num_samples > 1 else None

    @classmethod
    def load(cls, path, dtype, flag, trust_remote_code, allow_pickle, tokenizer_fallback, seed, prefix_cache=True):
        from model_loading import load_model

        model, tokenizer = load_model(path, dtype, trust_remote_code, flag=flag, allow_pickle=allow_pickle,
                                      tokenizer_fallback=tokenizer_fallback)
        return model.to(distributed.device()), tokenizer

    @staticmethod
    def prompt_limit(model, cfg: SamplingConfig) -> int:
        return max_positions(model.config) - cfg.max_new_tokens

    @staticmethod
    def record(tokenizer, cfg: SamplingConfig) -> dict:
        # the original's gen_config was generate's keyword arguments: they stay at the top level
        return {"engine": "hf", **generation_settings(tokenizer, cfg), "prefix_cache": cfg.prefix_cache}

    @torch.no_grad()
    def complete(self, ids: list[list[int]], cfg: SamplingConfig, seed: int, indices: list[int]) -> list[list[str]]:
        model, tokenizer, prefix = self.model, self.tokenizer, self.prefix
        if prefix is None:
            encoded, continuing = pad_left(tokenizer, ids), nullcontext({})
        else:
            encoded = encode_with_prefix(ids, prefix.length, tokenizer.pad_token_id)
            # generate sees the whole rows and the cache's length, and prefills only what the cache lacks
            room = encoded["input_ids"].shape[1] - prefix.length + cfg.max_new_tokens
            continuing = continuing_from(model, prefix, len(ids) * cfg.num_samples, room)
        encoded = {k: v.to(model.device) for k, v in encoded.items()}
        if cfg.do_sample:
            torch.manual_seed(seed)
        with continuing as extra:
            output = model.generate(**encoded, **extra, **generation_settings(tokenizer, cfg), tokenizer=tokenizer,
                                    synced_gpus=self.synced)
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return [texts[i * cfg.num_samples:(i + 1) * cfg.num_samples] for i in range(len(ids))]


# name -> the class, or "module:Class" for one whose library is imported only when it is asked for
ENGINES: dict[str, type[Engine] | str] = {"hf": HFEngine, "vllm": "vllm_engine:VLLMEngine"}


def engine_class(name: str) -> type[Engine]:
    found = ENGINES[name]
    if isinstance(found, str):
        module, _, attribute = found.partition(":")
        found = getattr(importlib.import_module(module), attribute)
    return found


def gen_config(tokenizer, cfg: SamplingConfig) -> dict:
    """What the output files record as `gen_config`: the engine and its settings."""
    return engine_class(cfg.engine).record(tokenizer, cfg)


def prompt_limit(model, cfg: SamplingConfig) -> int:
    return engine_class(cfg.engine).prompt_limit(model, cfg)


# ---------------------------------------------------------------- calls

def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig, desc: str = "generate",
             progress: bool = True, synced: bool = False) -> list[list[str]] | None:
    """`num_samples` continuations per prompt, in prompt order, on rank 0 (None on other ranks).

    Under several processes each rank takes every world_size-th batch; results are merged once.
    synced: the weights are sharded (ZeRO-3), so every rank must run the same number of forward
    passes: ranks get equal batch counts (padding with a repeat of their last batch, discarded)."""
    engine_type = engine_class(cfg.engine)
    ids = encode_ids(tokenizer, prompts, engine_type.prompt_limit(model, cfg))
    world = distributed.world_size()
    # an engine that batches by itself gets one batch per rank (still dealt the same whatever the ranks)
    batch_size = -(-len(ids) // world) if engine_type.whole_share else cfg.batch_size
    batches = plan_batches([len(row) for row in ids], max(1, batch_size))
    mine = list(range(distributed.rank(), len(batches), world))
    rounds = -(-len(batches) // world)
    synced = synced and world > 1
    if synced:
        mine += [mine[-1] if mine else 0] * (rounds - len(mine))
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    engine = engine_type(model, tokenizer, ids, cfg, synced)
    local: dict[int, list[str]] = {}
    for b in tqdm(mine, desc=desc, unit="batch", disable=not (progress and distributed.is_main())):
        indices = batches[b]
        outputs = engine.complete([ids[i] for i in indices], cfg, cfg.seed + b, indices)
        for i, texts in zip(indices, outputs):
            # records keep the original's shape, text only: the boundary space belongs to the token, not the answer
            local[i] = [t.split(STOP, 1)[0].removeprefix(BOUNDARY) for t in texts]
    if was_training:
        model.train()
    shards = distributed.gather_to_main(local)
    if shards is None:
        return None
    merged: dict[int, list[str]] = {}
    for shard in shards:
        merged.update(shard)
    if sorted(merged) != list(range(len(prompts))):
        raise RuntimeError(f"merged {len(merged)} results for {len(prompts)} prompts")
    return [merged[i] for i in range(len(prompts))]


def vote(task: TaskSpec, texts: list[str], gold: str, rationale: bool) -> dict:
    """Self-consistency over one question's samples: the most frequent extracted answer (ties: the one
    seen first; samples without an answer do not vote) and whether it, and any sample, is right."""
    graded = [grade(task, text, gold, rationale) for text in texts]
    counts = Counter(g["prediction"] for g in graded if g["prediction"] is not None)
    majority = counts.most_common(1)[0][0] if counts else None
    return {"predictions": [g["prediction"] for g in graded], "majority": majority,
            "majority_correct": majority is not None and any(g["correct"] for g in graded if g["prediction"] == majority),
            "any_correct": any(g["correct"] for g in graded)}


def self_consistency(task: TaskSpec, examples: list[Example], outputs: list[list[str]], rationale: bool) -> dict:
    """maj@k and pass@k over k samples per question (k: the samples each question has)."""
    votes = [vote(task, texts, ex.gold, rationale) for ex, texts in zip(examples, outputs)]
    k = len(outputs[0]) if outputs else 0
    total = max(1, len(votes))
    return {"k": k, f"maj@{k}": sum(v["majority_correct"] for v in votes) / total,
            f"pass@{k}": sum(v["any_correct"] for v in votes) / total, "votes": votes}


def evaluate(model, tokenizer, task: TaskSpec, examples: list[Example], demos: str, rationale: bool,
             cfg: SamplingConfig, desc: str = "eval", progress: bool = True, synced: bool = False,
             prompts: list[str] | None = None) -> dict | None:
    """Greedy accuracy (flexible and strict) with one record per item; None on ranks other than 0.
    `prompts`: one per example instead of `build_prompt`'s (e.g. with hints)."""
    prompts = prompts or [build_prompt(task, ex, demos, rationale) for ex in examples]
    outputs = generate(model, tokenizer, prompts, cfg, desc=desc, progress=progress, synced=synced)
    if outputs is None:
        return None
    records = []
    for ex, (text,) in zip(examples, outputs):
        records.append({"question": ex.question, "gold": ex.gold, "generated": text,
                        **grade(task, text, ex.gold, rationale)})
    total = len(records)
    correct = sum(r["correct"] for r in records)
    strict = sum(r["strict_correct"] for r in records)
    return {"correct": correct, "strict_correct": strict, "total": total,
            "acc": correct / total if total else 0.0, "strict_acc": strict / total if total else 0.0,
            "records": records}
