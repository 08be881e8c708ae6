"""The original's training step, literally: five forwards per batch (full text with grad for the
LM loss; the prefix without grad, its KV cache reused by the anchor, positive and negative
continuations, each its own forward). The tests and `bench/bench_train_step.py` hold
`shared_step.compute_tailored_loss` to it; nothing in training uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

import losses
from hf_internals import cache_kept, cache_kwarg, forward_params, lm_forward, output_cache
from losses import LossConfig
from train_batches import _pad, _triplet_parts, positions_from_mask


def five_pass_loss(model: torch.nn.Module, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The original step, one forward per piece; batch from `FivePassCollator`."""
    lm = torch.zeros((), dtype=torch.float32, device=batch["full_ids"].device)
    if cfg.mle in ("weight", "hf"):
        out = model(input_ids=batch["full_ids"], attention_mask=batch["full_mask"])  # right-padded: default positions
        lm = losses.weighted_lm_loss(out.logits, batch["full_ids"], batch["full_mask"], batch["full_cont_mask"],
                              cfg.mle, cfg.mle_w)
        del out
    if not cfg.contrastive:
        return lm, {"lm_loss": lm.detach()}
    prefix_mask = batch["prefix_mask"]
    with torch.no_grad(), cache_kept(model):  # a checkpointed layer of some transformers drops the cache
        prefix = lm_forward(model, batch["prefix_ids"], prefix_mask, positions_from_mask(prefix_mask), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in output_cache(prefix).layers]
    prefix_len = prefix_mask.sum(1)

    def on_prefix(ids: torch.Tensor, mask: torch.Tensor):
        cache = DynamicCache(ddp_cache_data=kv)  # a fresh copy: a forward extends its cache in place
        kwargs = {cache_kwarg(forward_params(model)): cache}
        with cache_kept(model):
            return model(input_ids=ids, attention_mask=torch.cat([prefix_mask, mask], 1),
                         position_ids=positions_from_mask(mask, prefix_len), use_cache=True,
                         output_hidden_states=True, **kwargs)

    reprs = []
    for name in ("anchor", "pos", "neg"):
        out = on_prefix(batch[f"{name}_ids"], batch[f"{name}_mask"])
        if name == "anchor" and cfg.mle == "nograd":
            lm = losses.weighted_lm_loss(out.logits, batch["anchor_ids"], batch["anchor_mask"], batch["anchor_mask"], "nograd")
        reprs.append(losses.representation(out.hidden_states[-1], batch[f"{name}_mask"], cfg.cl_repr))
        del out
    cl = losses.triplet_loss(*reprs, batch["triplet_mask"], cfg.cl_p) * cfg.cl_ratio
    metrics = {"lm_loss": lm.detach(), "cl_loss": cl.detach(), "triplet_fraction": batch["triplet_mask"].float().mean()}
    return lm + cl, metrics


@dataclass
class FivePassCollator:
    """Batch for `five_pass_loss`, padded as the original did (no shared columns).

        full_ids, full_mask, full_cont_mask  (B, T) prefix+continuation RIGHT-padded; cont marks the continuation
        prefix_ids, prefix_mask              (B, P) LEFT-padded prompt (as at inference)
        anchor_ids/_mask, pos_ids/_mask, neg_ids/_mask  RIGHT-padded continuations
        triplet_mask                         (B,)
    """
    pad_token_id: int
    eos_token_id: int
    contrastive: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        full = [f["prefix_ids"] + f["cont_ids"] for f in features]
        full_ids, full_mask = _pad(full, self.pad_token_id)
        cont_marks, _ = _pad([[0] * len(f["prefix_ids"]) + [1] * len(f["cont_ids"]) for f in features], 0)
        prefix_ids, prefix_mask = _pad([f["prefix_ids"] for f in features], self.pad_token_id, left=True)
        anchor_ids, anchor_mask = _pad([f["cont_ids"] for f in features], self.pad_token_id)
        batch = {"full_ids": full_ids, "full_mask": full_mask, "full_cont_mask": cont_marks,
                 "prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "anchor_ids": anchor_ids,
                 "anchor_mask": anchor_mask}
        if self.contrastive:
            seqs, triplet_mask = _triplet_parts(features, self.eos_token_id)
            batch["pos_ids"], batch["pos_mask"] = _pad(seqs[0::2], self.pad_token_id)
            batch["neg_ids"], batch["neg_mask"] = _pad(seqs[1::2], self.pad_token_id)
            batch["triplet_mask"] = triplet_mask
        return batch
