"""Few-shot generation from a shared-demos KV cache (prefix_cache.py, SamplingConfig.prefix_cache): the same
texts as prefilling every row's whole prompt, and a clean fallback where prompts share nothing."""
from __future__ import annotations

import pytest
import torch

import model_loading
import prefix_cache
from generation import HFEngine, SamplingConfig, encode_ids, generate
from prefix_cache import build_shared_prefix, encode_with_prefix
from tasks import build_prompt, get_task, load_demos, load_split


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student(tiny_student):
    return model_loading.load_model(str(tiny_student))


@pytest.fixture(scope="module")
def fewshot_prompts(data_dir) -> list[str]:
    task = get_task("wordmath")
    demos = load_demos(task, True, train=load_split("wordmath", "train", str(data_dir)))
    return [build_prompt(task, ex, demos) for ex in load_split("wordmath", "test", str(data_dir), 11)]


def both(model, tokenizer, prompts, **cfg) -> tuple[list, list]:
    plain = generate(model, tokenizer, prompts, SamplingConfig(prefix_cache=False, **cfg), progress=False)
    cached = generate(model, tokenizer, prompts, SamplingConfig(prefix_cache=True, **cfg), progress=False)
    return plain, cached


def test_fewshot_prompts_share_their_demos_as_one_cached_prefix(student, fewshot_prompts):
    model, tokenizer = student
    ids = encode_ids(tokenizer, fewshot_prompts, 1000)
    prefix = build_shared_prefix(model, ids)
    assert prefix is not None and prefix.length >= min(map(len, ids)) // 2  # the demos, not just "Question:"
    assert prefix.cache.get_seq_length() == prefix.length
    # every row, read through its mask, is exactly the tokenizer's ids of its prompt
    encoded = encode_with_prefix(ids[:5], prefix.length, tokenizer.pad_token_id)
    for row, mask, prompt in zip(encoded["input_ids"], encoded["attention_mask"], fewshot_prompts):
        assert row[mask.bool()].tolist() == tokenizer(prompt)["input_ids"]


@pytest.fixture(params=["shared attention", "per-row copies"])
def prefix_path(request, monkeypatch):
    """Both ways to continue from the prefix cache: one prefix copy read by `shared_prefix_attention`
    (models whose attention goes through the registered interface, as GPT-J), or per-row copies under
    the model's own attention (the fallback)."""
    if request.param == "per-row copies":
        monkeypatch.setattr(prefix_cache, "shares_prefix_attention", lambda model: False)
    return request.param


def test_greedy_outputs_are_identical_with_and_without_the_prefix_cache(student, fewshot_prompts, prefix_path):
    model, tokenizer = student
    attention = model.config._attn_implementation
    if prefix_path == "shared attention" and not prefix_cache.shares_prefix_attention(model):
        pytest.skip(f"this transformers' {type(model).__name__} has no attention interface to share the prefix through")
    ids = encode_ids(tokenizer, fewshot_prompts, 1000)
    assert build_shared_prefix(model, ids).shared_attention == (prefix_path == "shared attention")
    # batch 4 over 11 prompts: batches that mix suffix lengths (padding between demos and question),
    # and a short last batch
    plain, cached = both(model, tokenizer, fewshot_prompts, max_new_tokens=24, batch_size=4)
    assert cached == plain
    assert len(cached) == 11 and all(len(outs) == 1 for outs in cached)
    assert model.config._attn_implementation == attention  # the model's own attention is back


def test_sampling_several_sequences_per_prompt_matches_under_the_same_seed(student, fewshot_prompts, prefix_path):
    """n samples per prompt in one generate call: (prompts x n) rows share one expanded cache.

    The same seed gives the same texts as without the cache, not only valid shapes: the sampler draws from
    the same random stream over the same (rows, vocab) shapes, and the logits agree to float rounding (the
    attention sums the same terms in another order), so each draw falls the same way."""
    model, tokenizer = student
    cfg = dict(max_new_tokens=16, batch_size=3, do_sample=True, num_samples=3, temperature=1.0, top_k=50, seed=7)
    plain, cached = both(model, tokenizer, fewshot_prompts[:7], **cfg)
    assert [len(outs) for outs in cached] == [3] * 7
    assert cached == plain
    again = generate(model, tokenizer, fewshot_prompts[:7], SamplingConfig(prefix_cache=True, **cfg), progress=False)
    assert again == cached


def test_the_stored_prefix_cache_is_left_unchanged_by_batches(student, fewshot_prompts):
    model, tokenizer = student
    ids = encode_ids(tokenizer, fewshot_prompts[:6], 1000)
    cfg = SamplingConfig(max_new_tokens=8, num_samples=2, do_sample=True)
    engine = HFEngine(model, tokenizer, ids, cfg)
    prefix = engine.prefix
    keys = [layer.keys.clone() for layer in prefix.cache.layers]
    for start in (0, 3):
        engine.complete(ids[start:start + 3], cfg, seed=0, indices=list(range(start, start + 3)))
    assert prefix.cache.get_seq_length() == prefix.length
    assert all(torch.equal(layer.keys, k) and layer.keys.shape[0] == 1 for layer, k in zip(prefix.cache.layers, keys))


def test_prompts_without_a_shared_prefix_fall_back_to_whole_prompts(student):
    model, tokenizer = student
    prompts = ["Tom has 3 apples and buys 4 more.\nReasoning:", "Seven birds sit on a wire; two fly off.\nReasoning:",
               "Question: A box holds 12 eggs.\nReasoning:"]
    ids = encode_ids(tokenizer, prompts, 1000)
    assert prefix_cache.shared_prefix_length(ids) == 0
    assert build_shared_prefix(model, ids) is None
    plain, cached = both(model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert cached == plain


def test_shared_prefix_length_leaves_every_row_a_token_of_its_own():
    assert prefix_cache.shared_prefix_length([]) == 0
    assert prefix_cache.shared_prefix_length([[5, 6, 7]]) == 2
    assert prefix_cache.shared_prefix_length([[5, 6, 7], [5, 6, 7]]) == 2  # identical prompts
    assert prefix_cache.shared_prefix_length([[5, 6, 7, 8], [5, 6, 9]]) == 2
    assert prefix_cache.shared_prefix_length([[5, 6, 7, 8], [5, 6]]) == 1
    assert prefix_cache.shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_identical_and_overlong_prompts_still_match(student, fewshot_prompts):
    model, tokenizer = student
    same = [fewshot_prompts[0]] * 3  # the whole prompt is shared: the last token stays the rows' own
    plain, cached = both(model, tokenizer, same, max_new_tokens=10, batch_size=3)
    assert cached == plain and cached[0] == cached[1] == cached[2]
    # a prompt longer than the position table allows loses its oldest tokens (the demos' start), so the rows
    # share less, or nothing; the outputs still match
    long = [fewshot_prompts[1] * 3, fewshot_prompts[2]]
    plain, cached = both(model, tokenizer, long, max_new_tokens=300, batch_size=2)
    assert cached == plain


def test_buffered_layer_holds_what_a_dynamic_layer_holds_and_grows_past_its_room():
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    prefix, steps = torch.randn(1, 2, 5, 4), [torch.randn(3, 2, n, 4) for n in (2, 1, 1, 4)]
    dynamic, buffered = DynamicLayer(), prefix_cache.BufferedLayer(prefix.expand(3, -1, -1, -1), prefix.expand(3, -1, -1, -1), 3)
    dynamic.update(prefix.expand(3, -1, -1, -1), prefix.expand(3, -1, -1, -1))
    for step in steps:  # 2 + 1 fill the room of 3; 1 and 4 more grow the buffer
        assert all(torch.equal(a, b) for a, b in zip(buffered.update(step, -step), dynamic.update(step, -step)))
    assert buffered.get_seq_length() == dynamic.get_seq_length() == 13
    buffered.crop(-2)
    dynamic.crop(-2)
    assert torch.equal(buffered.update(steps[1], steps[1])[0], dynamic.update(steps[1], steps[1])[0])


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query heads share a key/value head
def test_shared_prefix_attention_equals_sdpa_over_whole_rows(kv_heads):
    """Prefix read once + each row's own part (with padding between them, causal inside) against sdpa
    over the rows' full keys and values, for a prefill of 3 queries."""
    torch.manual_seed(0)
    rows, heads, prefix_len, own_len, queries, dim = 3, 4, 7, 5, 3, 8
    prefix_k, prefix_v = torch.randn(1, kv_heads, prefix_len, dim), torch.randn(1, kv_heads, prefix_len, dim)
    layer = prefix_cache.SharedPrefixLayer(prefix_k, prefix_v, rows, room=4)
    own_k, own_v = layer.update(torch.randn(rows, kv_heads, own_len, dim), torch.randn(rows, kv_heads, own_len, dim))
    assert layer.get_seq_length() == prefix_len + own_len
    query = torch.randn(rows, heads, queries, dim)
    mask = torch.ones(rows, 1, queries, prefix_len + own_len, dtype=torch.bool)
    mask[..., -queries:] = torch.ones(queries, queries, dtype=torch.bool).tril()  # the last 3 own tokens are the queries
    mask[1, ..., prefix_len:prefix_len + 2] = False  # row 1: two pads between prefix and suffix

    class Cache:
        layers = [layer]

    token = prefix_cache._active_cache.set(Cache())
    try:
        out, _ = prefix_cache.shared_prefix_attention(type("Attention", (), {"layer_idx": 0})(), query, own_k, own_v,
                                                    mask, scaling=dim ** -0.5)
    finally:
        prefix_cache._active_cache.reset(token)
    full_k = torch.cat([prefix_k.expand(rows, -1, -1, -1), own_k], 2).repeat_interleave(heads // kv_heads, 1)
    full_v = torch.cat([prefix_v.expand(rows, -1, -1, -1), own_v], 2).repeat_interleave(heads // kv_heads, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_k, full_v, attn_mask=mask)
    assert out.shape == (rows, queries, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
