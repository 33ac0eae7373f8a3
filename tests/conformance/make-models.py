#!/usr/bin/env python3
"""Small random-weight GGUFs (F32) of each architecture the engine runs, with a real tokenizer.

    make-models.py VOCAB_DIR OUT_DIR
    make-models.py dequantize IN.gguf OUT.gguf

writes OUT_DIR/NAME.f32.gguf for every model below; tests/conformance/run.sh quantizes them with
llama.cpp's llama-quantize and compares llama.cpp's log-probabilities with ours. `dequantize`
writes a quantized file's weights back as F32 (the exact reference for that file).

Tokenizer: every `tokenizer.*` key of a llama.cpp vocabulary GGUF (ggml-vocab-NAME.gguf from
tests/bench/vocab-fixtures.sh), so prompts are real source files tokenized as that family does.

Weights: Gaussian, seeded. Rows are 256 wide (whole K-quant super-blocks). They are scaled so that
the model is not flat: attention scores have a spread of ~2 (attention prefers particular tokens,
so positions and RoPE matter), and the logits have a spread of about 10 (the top token usually
holds most of the probability: a median top-1 probability of ~0.7), so top-1 agreement and greedy
decoding test the arithmetic rather than ties between near-equal candidates.
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize as dequantize_tensor

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 512, 2
HEAD_DIM = HIDDEN // HEADS

# name -> (general.architecture, vocabulary, options)
MODELS = {
    # Llama 2 / CodeLlama: SentencePiece vocabulary, separate output matrix.
    "llama-spm": ("llama", "llama-spm", {}),
    # Llama 3.x: byte-level BPE vocabulary and llama3 RoPE factors (a `rope_freqs` tensor).
    "llama3": ("llama", "llama-bpe", {"rope_freqs": True}),
    # DeepSeek-Coder: llama with its own BPE vocabulary and linear RoPE scaling.
    "deepseek-coder": ("llama", "deepseek-coder", {"linear_scale": 4.0}),
    # Qwen2.5-Coder: q/k/v biases, NeoX RoPE, tied embeddings (the 0.5B/1.5B have no output.weight).
    "qwen2": ("qwen2", "qwen2", {"tied": True}),
    # StarCoder2: LayerNorm with bias, GELU MLP (up/down), biases everywhere, NeoX RoPE.
    "starcoder2": ("starcoder2", "starcoder", {}),
}


def copy_tokenizer(reader: GGUFReader, w: GGUFWriter) -> int:
    """Copy every tokenizer.* key; returns the vocabulary size."""
    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else GGUFValueType.STRING
            w.add_key_value(field.name, value, vtype, sub_type=sub)
        else:
            w.add_key_value(field.name, value, vtype)
        if field.name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab == 0:
        raise SystemExit("the vocabulary GGUF has no tokenizer.ggml.tokens")
    return n_vocab


def make(name: str, arch: str, vocab_name: str, opts: dict, vocab_dir: Path, out_dir: Path) -> None:
    rng = np.random.default_rng(sum(map(ord, name)) * 7919)
    reader = GGUFReader(vocab_dir / f"ggml-vocab-{vocab_name}.gguf")
    path = out_dir / f"{name}.f32.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_name(f"conformance-{name}")
    n_vocab = copy_tokenizer(reader, w)

    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0 if arch != "qwen2" else 1000000.0)
    if arch == "starcoder2":
        w.add_layer_norm_eps(1e-5)
        w.add_sliding_window(4096)
    else:
        w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)
    if "linear_scale" in opts:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(opts["linear_scale"])
    w.add_file_type(0)  # all F32

    def gauss(*shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def tensor(n, a):
        w.add_tensor(n, np.ascontiguousarray(a, dtype=np.float32))

    ln = arch == "starcoder2"
    embd_std = 0.6 if opts.get("tied") else 1.0
    tensor("token_embd.weight", gauss(n_vocab, HIDDEN, std=embd_std))
    if opts.get("rope_freqs"):
        # llama3 factors (factor 8, low 1, high 4, original context 8192), as convert_hf_to_gguf.py writes them.
        base, factor, low, high, orig = 10000.0, 8.0, 1.0, 4.0, 8192.0
        freqs = base ** -(np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
        wl = 2 * np.pi / freqs
        smooth = (orig / wl - low) / (high - low)
        f = np.where(wl < orig / high, 1.0, np.where(wl > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        tensor("rope_freqs.weight", f.astype(np.float32))
    s = 1.0 / np.sqrt(HIDDEN)
    out_scale = 4.0 if opts.get("tied") else 1.0
    for l in range(LAYERS):
        p = f"blk.{l}"
        tensor(f"{p}.attn_norm.weight", 1.0 + gauss(HIDDEN, std=0.1))
        # q and k: 1.5x the usual scale, so attention scores have a spread of ~2 (attention prefers
        # some tokens) without making the network chaotic (tiny rounding changing which token wins).
        tensor(f"{p}.attn_q.weight", gauss(HIDDEN, HIDDEN, std=1.5 * s))
        tensor(f"{p}.attn_k.weight", gauss(KV_HEADS * HEAD_DIM, HIDDEN, std=1.5 * s))
        tensor(f"{p}.attn_v.weight", gauss(KV_HEADS * HEAD_DIM, HIDDEN, std=s))
        # With tied embeddings the output matrix is the embedding: the blocks' outputs are made
        # 4x larger so the residual is not mostly the input token's row (which would predict itself).
        tensor(f"{p}.attn_output.weight", gauss(HIDDEN, HIDDEN, std=out_scale * s))
        tensor(f"{p}.ffn_norm.weight", 1.0 + gauss(HIDDEN, std=0.1))
        if arch != "starcoder2":
            tensor(f"{p}.ffn_gate.weight", gauss(FFN, HIDDEN, std=s))
        tensor(f"{p}.ffn_up.weight", gauss(FFN, HIDDEN, std=s))
        tensor(f"{p}.ffn_down.weight", gauss(HIDDEN, FFN, std=out_scale / np.sqrt(FFN)))
        if arch in ("qwen2", "starcoder2"):
            tensor(f"{p}.attn_q.bias", gauss(HIDDEN, std=0.5))
            tensor(f"{p}.attn_k.bias", gauss(KV_HEADS * HEAD_DIM, std=0.5))
            tensor(f"{p}.attn_v.bias", gauss(KV_HEADS * HEAD_DIM, std=0.1))
        if ln:
            tensor(f"{p}.attn_norm.bias", gauss(HIDDEN, std=0.1))
            tensor(f"{p}.attn_output.bias", gauss(HIDDEN, std=0.1))
            tensor(f"{p}.ffn_norm.bias", gauss(HIDDEN, std=0.1))
            tensor(f"{p}.ffn_up.bias", gauss(FFN, std=0.1))
            tensor(f"{p}.ffn_down.bias", gauss(HIDDEN, std=0.1))
    tensor("output_norm.weight", 1.0 + gauss(HIDDEN, std=0.1))
    if ln:
        tensor("output_norm.bias", gauss(HIDDEN, std=0.1))
    if not opts.get("tied"):
        # Logits spread ~10 after the final norm (rows of unit RMS).
        tensor("output.weight", gauss(n_vocab, HIDDEN, std=10.0 * s))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path)


def dequantize(src: Path, dst: Path) -> None:
    """The same model with every tensor dequantized to F32: what a quantized file computes without
    activation quantization, the exact value both implementations approximate."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else GGUFValueType.STRING
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        else:
            w.add_key_value(field.name, field.contents(), vtype)
    w.add_file_type(0)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w.add_tensor(t.name, np.ascontiguousarray(dequantize_tensor(t.data, t.tensor_type).reshape(shape), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "dequantize":
        dequantize(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    vocab_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (arch, vocab, opts) in MODELS.items():
        make(name, arch, vocab, opts, vocab_dir, out_dir)


if __name__ == "__main__":
    main()
