"""Checks of the torch forward pass (model.py) against the reference.

- the GGUF reader's dequantization is bit-exact vs the `gguf` package (if installed);
- logits match HF transformers' LlamaForCausalLM built from the same dequantized
  weights (un-permuted to HF's rotate_half layout), if transformers is installed;
- greedy decoding of a code prompt is sensible;
- a LoRA delta merged into the GGUF-layout weights (W + scale * B @ A) gives the
  same logits as the un-merged adapter (the merge the Rust engine will do).

Skips (with a message) when the model file or a package is missing.
"""
import os
import sys

import pytest

np = pytest.importorskip("numpy")  # CI without numpy: skip, not a collection error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GGUF = os.environ.get("ANCHORCODER_GGUF",
                      os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
torch = pytest.importorskip("torch")
if not os.path.exists(GGUF):
    pytest.skip(f"model file {GGUF} not found", allow_module_level=True)

from gguf_io import GGUFFile  # noqa: E402
from model import build_model, greedy, permute_qk, unpermute_qk  # noqa: E402
from policy import Policy  # noqa: E402


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model(GGUF, rank=4, alpha=8.0)


def test_dequant_bit_exact_vs_gguf_package():
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(GGUF)
    g = GGUFFile(GGUF)
    assert len(r.tensors) == len(g.tensors)
    for t in r.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        assert np.array_equal(ref, g.tensor(t.name)), t.name


def test_permute_roundtrip():
    w = np.arange(192 * 5, dtype=np.float32).reshape(192, 5)
    assert np.array_equal(permute_qk(unpermute_qk(w, 3), 3), w)


def _ids(g, text):
    from tokenizer import build_tokenizer
    return build_tokenizer(g).encode(text).ids


PROMPT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"


def test_logits_match_transformers(base):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    g, model, lut = base
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.dim, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_base, max_position_embeddings=8192, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_base}
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": g.tensor("token_embd.weight"),
          "model.norm.weight": g.tensor("output_norm.weight"),
          "lm_head.weight": g.tensor("token_embd.weight")}
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = g.tensor(f"blk.{l}.attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = g.tensor(f"blk.{l}.ffn_norm.weight")
        sd[p + "self_attn.q_proj.weight"] = unpermute_qk(g.tensor(f"blk.{l}.attn_q.weight"), cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = unpermute_qk(g.tensor(f"blk.{l}.attn_k.weight"), cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = g.tensor(f"blk.{l}.attn_v.weight")
        sd[p + "self_attn.o_proj.weight"] = g.tensor(f"blk.{l}.attn_output.weight")
        sd[p + "mlp.gate_proj.weight"] = g.tensor(f"blk.{l}.ffn_gate.weight")
        sd[p + "mlp.up_proj.weight"] = g.tensor(f"blk.{l}.ffn_up.weight")
        sd[p + "mlp.down_proj.weight"] = g.tensor(f"blk.{l}.ffn_down.weight")
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                             strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    ids = _ids(g, PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits[0].float()
        model.set_lora_enabled(False)
        mine = model(x, [None] * cfg.n_layers)[0]
        model.set_lora_enabled(True)
    err = (ref - mine).abs().max().item()
    print(f"max |logit diff| vs transformers: {err:.2e} (logit scale {ref.abs().max().item():.1f})")
    assert err < 2e-3
    assert torch.equal(ref.argmax(-1), mine.argmax(-1))


def test_greedy_is_sensible(base):
    pytest.importorskip("tokenizers")
    from tokenizer import build_tokenizer
    g, model, lut = base
    tok = build_tokenizer(g)
    ids = tok.encode(PROMPT).ids
    model.set_lora_enabled(False)
    out = greedy(model, lut, Policy("full", sink_tokens=4), ids, 12)
    model.set_lora_enabled(True)
    text = tok.decode(out[len(ids):])
    print("greedy:", repr(text))
    assert "return" in text or "f." in text or "for" in text, text


def test_masks_change_attention_but_dense_layers_equal_full(base):
    g, model, lut = base
    cfg = model.cfg
    ids = _ids(g, PROMPT * 3)
    x = torch.tensor([ids])
    from model import policy_masks
    with torch.no_grad():
        full = model(x, policy_masks(Policy("full"), lut, x, cfg.n_layers))
        causal = model(x, [None] * cfg.n_layers)
        # an explicit all-causal boolean mask == is_causal
        tri = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()[None, None]
        explicit = model(x, [tri] * cfg.n_layers)
        anchor = model(x, policy_masks(Policy("anchor", 0, 4, 0), lut, x, cfg.n_layers))
    assert torch.allclose(full, causal)
    assert (explicit - causal).abs().max() < 1e-3
    assert (anchor - full).abs().max() > 1e-2
    # tokens before the first anchor (+ sinks) see everything they would densely
    first_anchor = int(lut[x[0]].nonzero()[0])
    assert (anchor[0, :first_anchor + 1] - full[0, :first_anchor + 1]).abs().max() < 1e-3


def test_lora_merge_matches_unmerged(base):
    g, model, lut = base
    cfg = model.cfg
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.normal_(0, 0.02)
    ids = _ids(g, PROMPT)
    x = torch.tensor([ids])
    masks = [None] * cfg.n_layers
    with torch.no_grad():
        unmerged = model(x, masks)
        state = model.lora_state()
        saved = {}
        scale = model.alpha / model.rank
        for l, blk in enumerate(model.blocks):
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                m = getattr(blk, name)
                saved[(l, name)] = m.weight.clone()
                a, b = state[f"blk.{l}.{name}.lora_a"], state[f"blk.{l}.{name}.lora_b"]
                assert a.shape == (model.rank, m.weight.shape[1]) and b.shape == (m.weight.shape[0], model.rank)
                m.weight += scale * b @ a
        model.set_lora_enabled(False)
        merged = model(x, masks)
        model.set_lora_enabled(True)
        for (l, name), w in saved.items():
            getattr(model.blocks[l], name).weight.copy_(w)
        model.reset_lora()
    assert (merged - unmerged).abs().max() < 1e-3
