"""The shared step as a GPU runs it: --torch_compile compiles the step that actually runs (graphs that do not
grow with depth, no graph break, no recompile-limit hit), and the step never waits for the device to learn a
size (no host-device sync). Dynamo's plain `eager` backend stands in for inductor (whose C++ builds take
minutes on this CPU); what is counted here, graphs and breaks, is decided by dynamo before any backend."""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import hf_compat
import step_cache
from hf_internals import enable_checkpointing, unwrap
from losses import LossConfig
from shared_step import compute_tailored_loss
from speed import bucket_batch, compile_layers
from test_losses import batches, setup  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

aten = torch.ops.aten
ROW_SETS = ([0, 1, 2, 3], [1, 2, 3, 4], [0, 2, 3], [0, 1, 2, 3, 4], [0, 3, 4])


def llama(tokenizer, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).train()


def bucketed(tokenizer, features, row_sets=ROW_SETS) -> list[dict]:
    return [bucket_batch(batches(tokenizer, [features[i] for i in rows])[0], 16, tokenizer.pad_token_id)
            for rows in row_sets]


def train_steps(model, cfg: LossConfig, batch_list: list[dict], spy: TorchDispatchMode | None = None) -> None:
    """The steps on batches already collated (the collator works on the host, before the step: its reads of
    CPU tensors wait for nothing)."""
    for batch in batch_list:
        with spy or contextlib.nullcontext():
            loss, _ = compute_tailored_loss(model, batch, cfg)
            loss.backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_graphs_do_not_grow_with_depth(setup, checkpointing):
    """The cache-reading forwards once made one graph per decoder layer (dynamo specialised on the layer
    index): 12 layers hit the recompile limit in the first shared step and the rest ran uncompiled. Now a
    2-layer and a 12-layer model compile the same number of graphs, and the limit is never reached."""
    if checkpointing and not hf_compat.checkpoint_inside_compiled_layer():
        pytest.skip(f"transformers {hf_compat.installed()} replays checkpointed layers outside the compiled region "
                    "(run_trainer.py says so at start)")
    tokenizer, features = setup
    cfg = LossConfig(contrastive=True, mle="weight")
    graphs = {}
    for layers in (2, 12):
        torch._dynamo.reset()
        counters.clear()
        model = llama(tokenizer, layers)
        if checkpointing:
            enable_checkpointing(model)
        assert compile_layers(model, backend="eager") == layers
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a hit raises
            train_steps(model, cfg, bucketed(tokenizer, features))
        assert not counters["graph_break"], dict(counters["graph_break"])
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[12] == graphs[2] > 0
    assert graphs[12] < torch._dynamo.config.recompile_limit


class SyncSpy(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (.item(), int(), bool()),
    and ops whose output size depends on values (nonzero, masked_select, boolean-mask indexing,
    repeat_interleave without output_size). Ops inside the model's own forward are transformers' business
    and not counted, except in the cache layers this project hands it."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.inside_model = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_model and self._syncs(func, args, kwargs):
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/tests/" not in f.filename), None)
            self.found.append(f"{func} at {caller.filename}:{caller.lineno}" if caller else str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        packet = func._overloadpacket
        if packet in (aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero):
            return True
        if packet in (aten.index, aten._unsafe_index, aten.index_put, aten.index_put_):
            return any(t is not None and t.dtype == torch.bool for t in args[1])
        if packet is aten.repeat_interleave:
            return kwargs.get("output_size") is None
        return False


def watch_syncs(monkeypatch, model) -> SyncSpy:
    spy = SyncSpy()

    def enter(*_):
        spy.inside_model += 1

    def leave(*_):
        spy.inside_model -= 1

    unwrap(model).register_forward_pre_hook(enter)
    unwrap(model).register_forward_hook(leave)
    for layer_class in (step_cache._RecordingLayer, step_cache._PrefixLayer):
        def counted(self, *args, _update=layer_class.update, **kwargs):
            outer, spy.inside_model = spy.inside_model, 0
            try:
                return _update(self, *args, **kwargs)
            finally:
                spy.inside_model = outer
        monkeypatch.setattr(layer_class, "update", counted)
    return spy


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mle", ["weight", "nograd"])
def test_the_step_never_waits_for_the_device(setup, monkeypatch, checkpointing, mle):
    tokenizer, features = setup
    model = llama(tokenizer, 2)
    if checkpointing:
        enable_checkpointing(model)
    spy = watch_syncs(monkeypatch, model)
    train_steps(model, LossConfig(contrastive=True, mle=mle, cl_anchor="detached"),
                bucketed(tokenizer, features, ROW_SETS[:2]), spy)
    assert spy.found == []


def test_the_spy_sees_a_sync(setup, monkeypatch):
    """The check above can fail: the old way of finding the rows with a triplet (nonzero) is caught."""
    tokenizer, features = setup
    model = llama(tokenizer, 2)
    spy = watch_syncs(monkeypatch, model)
    batch = batches(tokenizer, features[:3])[0]
    with spy:
        batch["triplet_mask"].nonzero()
        int(batch["prefix_mask"].sum(1).max())
        batch["cont_ids"][batch["cont_mask"].bool()]
    assert len(spy.found) >= 3, spy.found
