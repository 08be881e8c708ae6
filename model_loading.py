"""Model, tokenizer and config from a hub name or a local HF folder, for generation and training alike.

A folder that cannot be read becomes one line naming the flag that gave it (`loading`); a local folder
must hold safetensors weights, or pickled ones the user has allowed (--allow_pickle).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import distributed
from common import UserError, looks_local


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
    """A folder without tokenizer files gave an empty-vocabulary tokenizer, which trained at loss 0 and crashed
    generation: such a folder, or any tokenizer without a vocabulary, is one error line instead."""
    if Path(path).is_dir() and not holds_tokenizer(Path(path)):
        raise UserError(f"{flag}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                        f"tokenizer beside the weights, or pass this folder as --checkpoint with --load the base model")
    with loading(flag, path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if len(tokenizer) == 0:
        raise UserError(f"{flag}: the tokenizer of {path} has an empty vocabulary")
    if tokenizer.pad_token is None:  # GPT-J ships none; eos is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    return tokenizer


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def holds_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


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
    if fallback and Path(path).is_dir() and not holds_tokenizer(Path(path)):
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
