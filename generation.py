"""Batched generation shared by evaluation (`infer.py`), the exam and evaluation during training.

Prompts are sorted by length and cut into batches globally; batches (not items) are dealt to
ranks, so every batch, and therefore every output, is the same whatever the number of
processes. Each sequence stops at the first blank line or eos. Tokens that every prompt of a call
opens with (the few-shot demos) are run once, and every batch continues from their KV cache
(`SamplingConfig.prefix_cache`, `build_shared_prefix`).
"""
from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

import distributed
from common import UserError, looks_local
from tasks import BOUNDARY, Example, TaskSpec, build_prompt, grade

STOP = "\n\n"


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
    # few-shot prompts share their demos: run them through the model once per call, not once per row
    # (off: every batch prefills whole prompts, the reference the prefix path must match)
    prefix_cache: bool = True


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
    return pad_left(tokenizer, encode_ids(tokenizer, prompts, max_length))


def pad_left(tokenizer, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """A batch of already-encoded prompts, left-padded (generation appends at the right edge)."""
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")


def prompt_limit(model, cfg: SamplingConfig) -> int:
    """Most prompt tokens a row may keep: the rest of the position table holds the new tokens."""
    return max_positions(model.config) - cfg.max_new_tokens


def encode_ids(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Each prompt's ids, unpadded; a prompt longer than max_length is cut on the left."""
    tokenizer.truncation_side = "left"  # a call takes padding_side but not truncation_side
    return tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]


# ---------------------------------------------------------------- shared-prefix (few-shot demos) cache

# Below this many shared tokens (zero-shot prompts share only "Question:") the saved prefill is too
# small to matter, and the plain left-padded path stays the one that runs.
MIN_SHARED_PREFIX = 16


@dataclass
class SharedPrefix:
    """The first `length` tokens every prompt of a call starts with, and their KV cache (batch 1).

    The cache is never handed to `generate` itself, which extends the cache it is given: each batch gets
    a cache of its own that reads this one (`_batch_cache`)."""
    ids: list[int]
    cache: object
    shared_attention: bool = False  # rows read one copy of it (`shared_prefix_attention`), not their own

    @property
    def length(self) -> int:
        return len(self.ids)


def shared_prefix_length(ids: list[list[int]]) -> int:
    """Length of the longest token prefix all rows share, backed off so that every row keeps at least
    one token of its own: the forward that continues from the cache needs one to give next-token logits.

    Cutting the rows' own ids (never re-tokenizing a cut text) keeps every row exactly `tokenizer(prompt)`,
    wherever BPE merges across the demo/question boundary."""
    if not ids:
        return 0
    common = os.path.commonprefix(ids)  # element-wise on lists too
    return max(0, min(len(common), min(map(len, ids)) - 1))


def _hf_model(model):
    """The HF model whose `generate` runs (peft keeps it inside)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(_hf_model(model).forward).parameters else "past_key_values"


def _plain_dynamic(cache) -> bool:
    """A cache whose layers only append (DynamicLayer): padding between prefix and suffix is then a masked
    column like any other. Sliding-window, static or quantized layers keep other state: not reused."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


@torch.no_grad()
def build_shared_prefix(model, ids: list[list[int]], min_length: int = MIN_SHARED_PREFIX) -> SharedPrefix | None:
    """The shared prefix of `ids` with its KV cache, or None when prompts share fewer than `min_length`
    tokens or the model cannot take it (then every batch prefills whole prompts, as before).

    Deterministic in `ids` and the model, so under ZeRO-3 every rank makes the same choice and runs the
    same one forward."""
    length = shared_prefix_length(ids)
    hf = _hf_model(model)
    params = inspect.signature(hf.forward).parameters
    # the rows' positions are not their column index once padding sits between prefix and suffix
    if length < min_length or "position_ids" not in params:
        return None
    prefix = torch.tensor([ids[0][:length]], device=hf.device)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the logits are not needed
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **kwargs)
    cache = getattr(out, "cache", None)  # transformers >= 5.2x; `past_key_values` before
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    if not _plain_dynamic(cache):
        return None
    return SharedPrefix(ids=ids[0][:length], cache=cache, shared_attention=shares_prefix_attention(model))


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for the tokens to come.

    DynamicLayer appends by torch.cat, copying the whole cache every step: with few-shot prompts that
    copy (rows x demos long, every layer, every new token) costs as much as the attention itself.
    Here a step writes only its new columns; `keys`/`values` are views of the filled part, the same
    values a DynamicLayer would hold."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._adopt(keys, values, room)

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        length = keys.shape[-2]
        self._keys = keys.new_empty(*keys.shape[:-2], length + room, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:-2], length + room, values.shape[-1])
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # e.g. ZeRO-3 ranks stepping on for a slower rank: grow, doubling
            self._adopt(self.keys, self.values, max(end - self.length, self._keys.shape[-2]))
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    # the rest of DynamicLayer's edits replace `keys`/`values`: take the results back into a buffer
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt(self.keys, self.values, 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt(self.keys, self.values, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt(self.keys, self.values, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt(self.keys, self.values, 0)


class SharedPrefixLayer(BufferedLayer):
    """The rows' own keys and values (after the shared prefix) in a buffer, and the prefix's once (batch 1)
    for all rows: `shared_prefix_attention` reads the prefix part without copying it per row.

    Lengths and mask sizes count the prefix, so positions and masks are those of the whole rows; `update`
    returns the own part only, which is why this layer runs only under that attention."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int, room: int):
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        own = prefix_keys.new_empty(rows, *prefix_keys.shape[1:-2], 0, prefix_keys.shape[-1])
        super().__init__(own, prefix_values.new_empty(own.shape[:-1] + prefix_values.shape[-1:]), room)

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length


SHARED_PREFIX_ATTENTION = "tailored_shared_prefix"
_active_cache: ContextVar = ContextVar("shared_prefix_cache")


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs):
    """Attention over [shared prefix | the row's own tokens] where the prefix keys/values are stored once.

    Decoding is memory-bound on a CPU: with per-row copies every step reads rows x prefix keys and values
    (the few-shot demos, most of each row); here the prefix part is one matmul of all rows' queries
    against one copy. One softmax over both parts (scores side by side), in float32 as eager attention.
    query (B, Hq, S, D); key/value: the rows' own part (B, Hkv, T, D); the mask spans prefix + own."""
    layer = _active_cache.get().layers[module.layer_idx]
    b, hq, s, d = query.shape
    hkv, own_len, prefix_len = key.shape[1], key.shape[2], layer.prefix_keys.shape[-2]
    rows = hq // hkv * s  # queries per kv head (grouped-query heads share one)
    scaling = d ** -0.5 if scaling is None else scaling
    q = query.float().reshape(b, hkv, rows, d)
    own = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, rows, T)
    if attention_mask is None:
        raise RuntimeError("shared-prefix attention needs a materialized mask")
    mask = attention_mask[..., prefix_len:]  # the prefix precedes every query: nothing to mask there
    mask = mask.unsqueeze(2).expand(b, mask.shape[1], hq // hkv, s, own_len).reshape(b, -1, rows, own_len)
    own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask
    by_head = q.transpose(0, 1).reshape(hkv, b * rows, d)  # all rows' queries against the one prefix copy
    shared = torch.matmul(by_head, layer.prefix_keys[0].float().transpose(-1, -2)) * scaling
    shared = shared.view(hkv, b, rows, prefix_len).transpose(0, 1)
    probs = torch.cat([shared, own], -1).softmax(-1)
    out = torch.matmul(probs[..., prefix_len:], value.float())
    prefix_probs = probs[..., :prefix_len].transpose(0, 1).reshape(hkv, b * rows, prefix_len)
    out += torch.matmul(prefix_probs, layer.prefix_values[0].float()).view(hkv, b, rows, d).transpose(0, 1)
    return out.view(b, hq, s, d).transpose(1, 2).to(query.dtype).contiguous(), None


def _materialized_mask(*args, **kwargs):
    """sdpa's boolean mask, never skipped for `is_causal`: the attention above always applies a mask."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, _materialized_mask)


def shares_prefix_attention(model) -> bool:
    """Whether `shared_prefix_attention` can stand in for the model's attention: its attention layers call
    the registered interface (`_supports_attention_backend`), with plain sdpa/eager math (no logit
    soft-capping or attention sinks)."""
    hf = _hf_model(model)
    config = hf.config
    return (getattr(type(hf), "_supports_attention_backend", False) and config._attn_implementation in ("sdpa", "eager")
            and not getattr(config, "attn_logit_softcapping", None)
            and not any(hasattr(m, "sinks") for m in hf.modules())
            and all(hasattr(m, "layer_idx") for m in hf.modules() if type(m).__name__.endswith("Attention")))


@contextmanager
def prefix_attention(model, cache) -> Iterator[None]:
    """Run the model under `shared_prefix_attention` reading `cache`, then restore its attention."""
    configs = {id(m.config): m.config for m in _hf_model(model).modules() if hasattr(m, "config")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    token = _active_cache.set(cache)
    try:
        for config in configs.values():
            config._attn_implementation = SHARED_PREFIX_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]
        _active_cache.reset(token)


def _batch_cache(prefix: SharedPrefix, rows: int, room: int, shared: bool):
    """A private cache for one `generate` call of `rows` rows (prompts x samples), holding the prefix
    and room for `room` more tokens per row: the prefix once (`shared`, for `shared_prefix_attention`),
    else copied into every row. The stored cache is never written."""
    cache = copy.copy(prefix.cache)
    if shared:
        cache.layers = [SharedPrefixLayer(layer.keys, layer.values, rows, room) for layer in prefix.cache.layers]
    else:
        cache.layers = [BufferedLayer(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1),
                                      room) for layer in prefix.cache.layers]
    return cache


def encode_with_prefix(rows: list[list[int]], prefix_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows as [shared prefix | padding | own suffix]: suffixes right-aligned (generation appends at the
    right edge), the padding masked out. `generate` derives position ids from the mask (cumsum), so each
    row's tokens keep the positions 0..len-1 they have unpadded, the same as with left padding."""
    width = max(map(len, rows)) - prefix_length
    ids = torch.full((len(rows), prefix_length + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :prefix_length] = torch.tensor(rows[0][:prefix_length])
    mask[:, :prefix_length] = 1
    for i, row in enumerate(rows):
        suffix = row[prefix_length:]
        ids[i, ids.shape[1] - len(suffix):] = torch.tensor(suffix)
        mask[i, ids.shape[1] - len(suffix):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------- batches

@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int,
                    synced: bool = False, ids: list[list[int]] | None = None,
                    prefix: SharedPrefix | None = None) -> list[list[str]]:
    """`num_samples` texts per prompt, from the prompts' `ids` (encode_ids). With `prefix`, the prompts'
    shared tokens come from its cache and only the rest is prefilled."""
    extra, attention = {}, nullcontext()
    if prefix is None:
        encoded = pad_left(tokenizer, ids)  # `generate` has encoded every prompt once already
    else:
        encoded = encode_with_prefix(ids, prefix.length, tokenizer.pad_token_id)
        # generate sees the whole rows and the cache's length, and prefills only what the cache lacks
        room = encoded["input_ids"].shape[1] - prefix.length + cfg.max_new_tokens
        cache = _batch_cache(prefix, len(prompts) * cfg.num_samples, room, prefix.shared_attention)
        extra[_cache_kwarg(model)] = cache
        if prefix.shared_attention:
            attention = prefix_attention(model, cache)
    encoded = {k: v.to(model.device) for k, v in encoded.items()}
    if cfg.do_sample:
        torch.manual_seed(seed)
    with attention:
        output = model.generate(**encoded, **extra, **generation_settings(tokenizer, cfg), tokenizer=tokenizer,
                                synced_gpus=synced)
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
    and `generate` keeps stepping until all ranks are done. The shared-prefix forward runs once on
    every rank (all ranks see all prompts, so all decide alike).

    cfg.prefix_cache: when all prompts open with the same tokens (few-shot demos), those are run once
    and every batch continues from their cache; each row's tokens are the same as without."""
    ids = encode_ids(tokenizer, prompts, prompt_limit(model, cfg))
    batches = plan_batches([len(row) for row in ids], cfg.batch_size)
    world = distributed.world_size()
    mine = list(range(distributed.rank(), len(batches), world))
    rounds = -(-len(batches) // world)
    synced = synced and world > 1
    if synced:
        mine += [mine[-1] if mine else 0] * (rounds - len(mine))
    was_training = model.training
    model.eval()
    # a single row has no one to share its prefill with
    prefix = build_shared_prefix(model, ids) if cfg.prefix_cache and len(ids) * cfg.num_samples > 1 else None
    local: dict[int, list[str]] = {}
    for b in tqdm(mine, desc=desc, unit="batch", disable=not (progress and distributed.is_main())):
        indices = batches[b]
        outputs = _generate_batch(model, tokenizer, [prompts[i] for i in indices], cfg, cfg.seed + b, synced,
                                  ids=[ids[i] for i in indices], prefix=prefix)
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
