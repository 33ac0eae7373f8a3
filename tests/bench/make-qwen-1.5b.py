#!/usr/bin/env python3
"""A random-weight F16 GGUF of Qwen2.5-Coder-1.5B's exact shape, with the real qwen2 tokenizer.

    make-qwen-1.5b.py VOCAB_DIR OUT.gguf

For speed and memory measurements only (tests/bench/bench-qwen-1.5b.sh quantizes it to Q4_K_M):
the shape is the model's (hidden 1,536, intermediate 8,960, 28 layers, 12 query heads and 2 K/V
heads of 128, vocabulary 151,936, tied embeddings, q/k/v biases, RoPE base 10⁶, RMSNorm ε 10⁻⁶,
32,768-token context), the weights are seeded Gaussians scaled as in
tests/conformance/make-models.py (whose tokenizer copy this reuses), so every kernel does the
work it does on the real model. The vocabulary is Qwen2.5-Coder's as
tests/conformance/infill-prompts.py writes it (llama.cpp's qwen2 fixture, 151,936 entries, with
Qwen2.5's added tokens named). Never commit the output (3.1 GB).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 1536, 8960, 28, 12, 2, 151936
HEAD_DIM = HIDDEN // HEADS


def load(name: str, file: str):
    path = Path(__file__).resolve().parent.parent / "conformance" / file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    vocab_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    make_models = load("make_models", "make-models.py")
    infill = load("infill_prompts", "infill-prompts.py")
    reader = GGUFReader(vocab_dir / "ggml-vocab-qwen2.gguf")
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    if len(tokens) != VOCAB:
        raise SystemExit(f"the qwen2 vocabulary has {len(tokens)} tokens, the model {VOCAB}")
    infill.qwen25_coder_vocab(tokens, None, types)

    class Vocab:
        """The vocabulary GGUF's fields, Qwen2.5-Coder's added tokens named (what copy_tokenizer reads)."""

        fields = dict(reader.fields)

    Vocab.fields["tokenizer.ggml.tokens"] = _Field(reader.fields["tokenizer.ggml.tokens"], tokens)
    Vocab.fields["tokenizer.ggml.token_type"] = _Field(reader.fields["tokenizer.ggml.token_type"], types)

    w = GGUFWriter(str(out), "qwen2")
    w.add_name("random-qwen2.5-coder-1.5b-shape")
    assert make_models.copy_tokenizer(Vocab, w) == VOCAB
    w.add_context_length(32768)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1)  # mostly F16

    rng = np.random.default_rng(1536)

    def gauss(*shape, std, dtype=np.float16):
        a = np.empty(shape, dtype=dtype)
        flat = a.reshape(-1)
        step = 1 << 24  # in slices, so the float64 draw never holds a whole matrix
        for i in range(0, flat.size, step):
            k = min(step, flat.size - i)
            flat[i : i + k] = rng.standard_normal(k, dtype=np.float32) * std
        return a

    s = 1.0 / np.sqrt(HIDDEN)
    kv = KV_HEADS * HEAD_DIM
    w.add_tensor("token_embd.weight", gauss(VOCAB, HIDDEN, std=0.6))
    for l in range(LAYERS):
        p = f"blk.{l}"
        w.add_tensor(f"{p}.attn_norm.weight", 1.0 + gauss(HIDDEN, std=0.1, dtype=np.float32))
        w.add_tensor(f"{p}.attn_q.weight", gauss(HIDDEN, HIDDEN, std=1.5 * s))
        w.add_tensor(f"{p}.attn_k.weight", gauss(kv, HIDDEN, std=1.5 * s))
        w.add_tensor(f"{p}.attn_v.weight", gauss(kv, HIDDEN, std=s))
        w.add_tensor(f"{p}.attn_q.bias", gauss(HIDDEN, std=0.5, dtype=np.float32))
        w.add_tensor(f"{p}.attn_k.bias", gauss(kv, std=0.5, dtype=np.float32))
        w.add_tensor(f"{p}.attn_v.bias", gauss(kv, std=0.1, dtype=np.float32))
        w.add_tensor(f"{p}.attn_output.weight", gauss(HIDDEN, HIDDEN, std=4.0 * s))
        w.add_tensor(f"{p}.ffn_norm.weight", 1.0 + gauss(HIDDEN, std=0.1, dtype=np.float32))
        w.add_tensor(f"{p}.ffn_gate.weight", gauss(FFN, HIDDEN, std=s))
        w.add_tensor(f"{p}.ffn_up.weight", gauss(FFN, HIDDEN, std=s))
        w.add_tensor(f"{p}.ffn_down.weight", gauss(HIDDEN, FFN, std=4.0 / np.sqrt(FFN)))
    w.add_tensor("output_norm.weight", 1.0 + gauss(HIDDEN, std=0.1, dtype=np.float32))
    # No output.weight: tied to token_embd, as in the released 0.5B/1.5B.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(out)


class _Field:
    """A GGUFReader field with replaced contents (what copy_tokenizer reads)."""

    def __init__(self, field, value):
        self.name, self.types, self._value = field.name, field.types, value

    def contents(self):
        return self._value


if __name__ == "__main__":
    main()
