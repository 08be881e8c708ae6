"""The embedded student: a tiny GPT-J built offline, with a tokenizer trained on the task text.

It is saved as an ordinary HF checkpoint (safetensors + tokenizer.json), so every script loads
it through `--load <folder>` exactly like a hub model. The warm start is a short plain LM
fit on gold rationales: it stands in for the pre-training a real student brings, leaving a
round-0 student that solves some problems but not all.
"""
from __future__ import annotations

import random
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from train_data import PairEncoder

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so numbers are spelled digit by digit."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    fast.padding_side = "left"
    return fast


def build_model(tokenizer, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, n_positions: int = 1024,
                seed: int = 0) -> GPTJForCausalLM:
    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, rotary_dim=n_embd // n_head // 2, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        tie_word_embeddings=False,
                        # GPT-J's own tanh-approximate GELU as one fused kernel: the same function (to 3e-7), 2.4x
                        # faster than "gelu_new"'s chain of elementwise ops, which took ~10% of the demo's training
                        activation_function="gelu_pytorch_tanh")
    return GPTJForCausalLM(config)


def warm_start(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int = 32, lr: float = 2e-3,
               seed: int = 0, log_every: int = 50) -> list[float]:
    """Plain causal-LM fit on (prompt, continuation) pairs; returns the loss curve.

    Pairs are tokenized as training rows are (`train_data.PairEncoder`)."""
    rng = random.Random(seed)
    encoder = PairEncoder(tokenizer)
    encoded = [sum(encoder.pair(p, c, max_length=10**9)[:2], []) for p, c in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Linear warm-up then constant, the schedule run_trainer.py uses: later rounds continue the same run.
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses, started = [], time.time()
    bar = tqdm(range(steps), desc="warm start", unit="step")
    for step in bar:
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        # fp32: bf16 autocast is 10x slower on CPUs without native bf16 (AVX2), and one precision
        # everywhere keeps the embedded student the same on every machine
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}")
    model.eval()
    print(f"warm start: {steps} steps in {time.time() - started:.0f}s, final loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses
