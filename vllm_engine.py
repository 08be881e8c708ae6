"""vLLM as the generation engine (`--engine vllm`): the same prompts, cut and post-processing as the HF path.

The prompts go in as token ids (`generation.encode_ids`: the same left cut to the position table), the new
tokens come back as ids and are decoded by our tokenizer, then cut at the blank line by `generation.generate`,
so the texts are those the HF engine would write when the model's choices agree. What vLLM adds: continuous
batching over all of a process's prompts, paged KV cache with automatic prefix caching (the few-shot demos are
prefilled once), and n samples per prompt in one request, seeded per question (`--seed` + its index), so a
question's samples do not depend on how prompts were batched or dealt to processes.

Several `--device` ids: one engine per process and GPU (data parallel: each takes its share of the prompts),
under torchrun with vLLM's `external_launcher`. A model too big for one card needs tensor parallelism, which
this file does not set up (`vllm serve --tensor-parallel-size N` is the route for that).

vLLM is not among the project's requirements (it pins other transformers versions): `bash scripts/env.sh
--vllm` builds a second environment, `.venv-vllm`, for it.
"""
from __future__ import annotations

import os
import sys

import torch

from common import UserError

INSTALL = "bash scripts/env.sh --vllm, then run the script with .venv-vllm/bin/python"

try:
    import vllm
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
except ImportError as err:
    raise UserError(f"--engine vllm: vLLM cannot be imported by {sys.executable} ({err}); to install it: {INSTALL}") from None

import distributed
from generation import STOP, SamplingConfig
from model_loading import check_model_path, load_config, load_tokenizer, max_positions, tokenizer_source


class SuppressFirstTokens(AdapterLogitsProcessor):
    """No special token as the first new token (the HF path's `begin_suppress_tokens`): a request names the
    ids in `extra_args["suppress_first"]`. vLLM's own min_tokens would also end a sample at any of them later."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        banned = (params.extra_args or {}).get("suppress_first")
        if not banned:
            return None

        def suppress(output_ids: list[int], logits):
            if not output_ids:
                logits[banned] = float("-inf")
            return logits
        return suppress


def sampling_params(tokenizer, cfg: SamplingConfig, seed: int | None = None) -> dict:
    """vLLM's SamplingParams for `cfg`, as plain values (also what gen_config records, without the seed)."""
    params = dict(n=cfg.num_samples, max_tokens=cfg.max_new_tokens, stop=[STOP], skip_special_tokens=True)
    if cfg.do_sample:
        params.update(temperature=cfg.temperature, top_k=cfg.top_k)  # top_k 0: every token, in both libraries
    else:
        params.update(temperature=0.0)
    if cfg.suppress_special_first:
        params["extra_args"] = {"suppress_first": sorted(set(tokenizer.all_special_ids))}
    if seed is not None:
        params["seed"] = seed
    return params


def check_head_size(config, path: str, flag: str) -> None:
    """vLLM's CPU attention serves a fixed set of head sizes and finds out only at the first request, where the
    engine dies with a traceback: an unsupported one is one line here instead."""
    if torch.cuda.is_available():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    size = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if size is not None and size not in supported:
        raise UserError(f"{flag}: {path} has attention heads of size {size}, which vLLM's CPU attention does not "
                        f"serve (it does {', '.join(map(str, supported))}); use --engine hf")


class VLLMEngine:
    """One `vllm.LLM` per process, given all of its share of a call's prompts at once."""
    whole_share = True

    def __init__(self, llm, tokenizer, ids: list[list[int]], cfg: SamplingConfig, synced: bool = False):
        self.llm, self.tokenizer = llm, tokenizer

    @classmethod
    def load(cls, path, dtype, flag, trust_remote_code, allow_pickle, tokenizer_fallback, seed,
             prefix_cache: bool = True):
        if allow_pickle:
            raise UserError(f"{flag}: --engine vllm loads safetensors weights only; convert {path} or use --engine hf")
        check_model_path(path, flag)
        config = load_config(path, flag, trust_remote_code)
        check_head_size(config, path, flag)
        source = tokenizer_source(path, tokenizer_fallback)
        tokenizer = load_tokenizer(source, trust_remote_code, flag)
        settings = dict(model=path, tokenizer=source, seed=seed, trust_remote_code=trust_remote_code,
                        enable_prefix_caching=prefix_cache, logits_processors=[SuppressFirstTokens])
        if dtype is None:  # HF then loads the dtype the config names; vLLM's "auto" would make float32 bfloat16 on a CPU
            dtype = getattr(config, "dtype", None) or "float32"
        settings["dtype"] = str(dtype).removeprefix("torch.")
        if distributed.world_size() > 1:
            settings["distributed_executor_backend"] = "external_launcher"  # one engine per torchrun process
        if not torch.cuda.is_available():
            # vLLM 0.32's CPU runner crashes when it discards the token of a seeded request whose prompt chunked
            # prefill split ("CPU Generator does not use offset"): whole prompts only
            settings["enable_chunked_prefill"] = False
        # the CPU build sizes its KV cache from this variable; a few-shot evaluation of a small model needs little
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        try:
            llm = vllm.LLM(**settings)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{flag}: vLLM cannot load {path} ({first[:300]})") from None
        return llm, tokenizer

    @staticmethod
    def prompt_limit(llm, cfg: SamplingConfig) -> int:
        return min(llm.llm_engine.model_config.max_model_len, max_positions(llm.llm_engine.model_config.hf_config)) \
            - cfg.max_new_tokens

    @staticmethod
    def record(tokenizer, cfg: SamplingConfig) -> dict:
        return {"engine": "vllm", "vllm_version": vllm.__version__, **sampling_params(tokenizer, cfg),
                "seed": f"{cfg.seed} + the prompt's index" if cfg.do_sample else None,
                "enable_prefix_caching": cfg.prefix_cache}

    def complete(self, ids: list[list[int]], cfg: SamplingConfig, seed: int, indices: list[int]) -> list[list[str]]:
        requests = [vllm.TokensPrompt(prompt_token_ids=row) for row in ids]
        params = [vllm.SamplingParams(**sampling_params(self.tokenizer, cfg, cfg.seed + i if cfg.do_sample else None))
                  for i in indices]
        outputs = self.llm.generate(requests, params, use_tqdm=distributed.is_main())
        # our tokenizer decodes the ids, as on the HF path; generate() then cuts at the blank line
        return [[self.tokenizer.decode(list(sample.token_ids), skip_special_tokens=True) for sample in out.outputs]
                for out in outputs]
