"""Batched generation shared by evaluation (`infer.py`), the exam and evaluation during training.

Prompts are sorted by length and cut into batches globally; batches (not items) are dealt to
ranks, so every batch, and therefore every output, is the same whatever the number of
processes. Each sequence stops at the first blank line or eos.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import distributed
from common import UserError
from tasks import BOUNDARY, Example, TaskSpec, build_prompt, grade

STOP = "\n\n"


def looks_local(path: str) -> bool:
    """Hub names are 'org/name'; anything else, or a path under an existing folder here, is local."""
    return (path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
            or os.path.isdir(path.split("/")[0]))


@contextmanager
def loading(flag: str, path: str) -> Iterator[None]:
    """A model folder or hub name that cannot be read (corrupt config.json, truncated weights, an
    unknown hub name offline) becomes one line naming the flag, not a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # JSON errors are ValueErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{flag}: cannot load {path} ({first[:300]})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, flag: str = "--load"):
    with loading(flag, path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # GPT-J ships none; eos is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    return tokenizer


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def load_model(path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False, flag: str = "--load",
               allow_pickle: bool = False, tokenizer_fallback: str | None = None):
    """Model and tokenizer from a hub name or a local HF folder (safetensors; pickled weights only with
    `allow_pickle`). The original saved checkpoints without a tokenizer: a folder without one takes
    `tokenizer_fallback`'s (the base model, --load)."""
    check_model_path(path, flag, allow_pickle)
    tokenizer = load_tokenizer(tokenizer_source(path, tokenizer_fallback), trust_remote_code, flag)
    model = load_weights(path, flag, allow_pickle, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def tokenizer_source(path: str, fallback: str | None) -> str:
    """`path`, or `fallback` (said once) when `path` is a folder without tokenizer files."""
    if fallback and Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        if distributed.is_main():
            print(f"note: {path} holds no tokenizer; using the one of --load {fallback}")
        return fallback
    return path


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def check_model_path(path: str, flag: str, allow_pickle: bool = False) -> None:
    """A local model folder must exist and hold safetensors weights, or pickled ones (the original's
    pytorch_model.bin) that the user has allowed."""
    folder = Path(path)
    if looks_local(path) and not folder.is_dir():
        raise UserError(f"{flag}: checkpoint folder {path} not found")
    if not folder.is_dir() or _has_safetensors(folder):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin") if p.name != "training_args.bin")
    if not pickles:
        raise UserError(f"{flag}: {path} holds no model weights (*.safetensors or pytorch_model.bin)")
    if not allow_pickle:
        raise UserError(f"{flag}: {path} holds a pickle file ({pickles[0]}), and unpickling can run code from the "
                        f"file; if you trust it, --allow_pickle yes loads it")


def load_weights(path: str, flag: str, allow_pickle: bool = False, **kwargs):
    """AutoModelForCausalLM from safetensors (from a pickle only when allowed and the folder has no
    safetensors); a load failure is one line naming the flag."""
    folder = Path(path)
    use_safetensors = True
    if allow_pickle:
        use_safetensors = None if not folder.is_dir() else _has_safetensors(folder)  # hub: safetensors first
    with loading(flag, path):
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=use_safetensors, **kwargs)


def load_config(path: str, flag: str, trust_remote_code: bool = False):
    with loading(flag, path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def torch_dtype(fp16: bool, bf16: bool) -> torch.dtype | None:
    if fp16 and bf16:
        raise UserError("--fp16 and --bf16: choose one")
    return torch.float16 if fp16 else torch.bfloat16 if bf16 else None


def max_positions(config) -> int:
    """Longest sequence the model's position table holds (GPT-J: n_positions)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 10**9


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


def generation_settings(tokenizer, cfg: SamplingConfig) -> dict:
    """The keyword arguments `generate` gets (besides the tokenizer and ZeRO-3 sync): plain JSON values,
    also written into the Acc file as `gen_config`."""
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
    tokenizer.truncation_side = "left"  # a call takes padding_side but not truncation_side
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                     max_length=max_length)


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int,
                    synced: bool = False) -> list[list[str]]:
    encoded = encode_prompts(tokenizer, prompts, max_positions(model.config) - cfg.max_new_tokens).to(model.device)
    if cfg.do_sample:
        torch.manual_seed(seed)
    output = model.generate(**encoded, **generation_settings(tokenizer, cfg), tokenizer=tokenizer, synced_gpus=synced)
    texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    # records keep the original's shape, text only: the boundary space belongs to the token, not the answer
    texts = [t.split(STOP, 1)[0].removeprefix(BOUNDARY) for t in texts]
    return [texts[i * cfg.num_samples:(i + 1) * cfg.num_samples] for i in range(len(prompts))]


def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig, desc: str = "generate",
             progress: bool = True, synced: bool = False) -> list[list[str]] | None:
    """`num_samples` continuations per prompt, in prompt order, on rank 0 (None on other ranks).

    Under several processes each rank takes every world_size-th batch; results are merged once.
    synced: the weights are sharded (ZeRO-3), so every rank must run the same number of forward
    passes: ranks get equal batch counts (padding with a repeat of their last batch, discarded)
    and `generate` keeps stepping until all ranks are done."""
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    batches = plan_batches(lengths, cfg.batch_size)
    world = distributed.world_size()
    mine = list(range(distributed.rank(), len(batches), world))
    rounds = -(-len(batches) // world)
    synced = synced and world > 1
    if synced:
        mine += [mine[-1] if mine else 0] * (rounds - len(mine))
    was_training = model.training
    model.eval()
    local: dict[int, list[str]] = {}
    for b in tqdm(mine, desc=desc, unit="batch", disable=not (progress and distributed.is_main())):
        indices = batches[b]
        outputs = _generate_batch(model, tokenizer, [prompts[i] for i in indices], cfg, cfg.seed + b, synced)
        for i, outs in zip(indices, outputs):
            local[i] = outs
    model.train(was_training)
    shards = distributed.gather_to_main(local)
    if shards is None:
        return None
    merged: dict[int, list[str]] = {}
    for shard in shards:
        merged.update(shard)
    if sorted(merged) != list(range(len(prompts))):
        raise RuntimeError(f"merged {len(merged)} results for {len(prompts)} prompts")
    return [merged[i] for i in range(len(prompts))]


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
