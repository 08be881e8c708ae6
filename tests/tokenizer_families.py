"""Small tokenizers of the two families real students use, trained offline on task text.

byte_level_bpe: GPT-2 / Llama-3 style (ByteLevel pre-tokenizer, a space joins the next word: "ĠTom"),
    with a BOS added to every text as Llama-3 does.
sentencepiece: Llama-2 / Mistral style tokenizer.json (the text gets a leading "▁" and every space
    becomes "▁": "▁Tom"), BOS added by the post-processor. Tokenized alone, a continuation that
    opens with a space gets a doubled "▁▁".
Both are built with `tokenizers` the way those checkpoints' tokenizer.json files are laid out."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def _wrap(tok: Tokenizer, bos: str, eos: str) -> PreTrainedTokenizerFast:
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.pad_token = eos
    return fast


def byte_level_bpe(texts: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok, bos, eos)


def sentencepiece(texts: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    bos, eos = "<s>", "</s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece never merges across a word start; the normalizer has already placed every "▁"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", bos, eos]))
    return _wrap(tok, bos, eos)
