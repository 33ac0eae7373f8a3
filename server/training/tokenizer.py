"""The default model's tokenizer, built with the `tokenizers` package from the GGUF.

Recipe from shared/notes/default-model.md (matched llama.cpp's ids on 55/55 samples):
byte-level BPE from the GGUF vocab + merges, pre-tokenizer
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)],
ByteLevel decoder, ids 0-16 as special tokens.
"""
from __future__ import annotations

from gguf_io import GGUFFile


def build_tokenizer(g: GGUFFile):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    md = g.metadata
    tokens = md["tokenizer.ggml.tokens"]
    merges = md["tokenizer.ggml.merges"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type")
    specials = [i for i in range(len(tokens)) if types is not None and types[i] == 3]
    if not specials:
        specials = list(range(17))
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
    return tok
