"""Llama forward pass in PyTorch from the dequantized GGUF weights, with a
per-layer attention mask from the policy and LoRA on attn_q/k/v/output.

Weight layout: every matrix is kept exactly as the GGUF stores it, W[out, in]
with y = W @ x (what llama.cpp and candle load). In particular attn_q / attn_k
are in the GGUF's PERMUTED layout (llama.cpp's convert script reorders the
rows of each head so that RoPE rotates interleaved pairs (2i, 2i+1), llama.cpp's
"normal" rope mode), so this model applies RoPE to interleaved pairs. The LoRA
deltas therefore live in the same layout: W' = W + (alpha/rank) * B @ A can be
added to the GGUF-layout weights directly. (HF's LlamaForCausalLM uses the
un-permuted layout with rotate_half; `unpermute_qk` converts, see
test_model.py, which checks this forward pass against transformers.)
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gguf_io import GGUFFile, LlamaConfig, anchor_table, llama_config
from policy import Policy, layer_masks_torch


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (interleaved-pair RoPE) row order -> HF (rotate_half) row order.

    Inverse of llama.cpp's convert `permute`: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).
    """
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> GGUF row order (llama.cpp's convert `permute`)."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


class LoRALinear(nn.Module):
    """y = x W^T + (alpha/r) (x A^T) B^T, W frozen [out, in], A [r, in], B [out, r]."""

    def __init__(self, weight: torch.Tensor, rank: int = 0, alpha: float = 1.0):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.rank = rank
        self.scale = alpha / rank if rank > 0 else 0.0
        if rank > 0:
            out_f, in_f = weight.shape
            self.lora_a = nn.Parameter(torch.empty(rank, in_f, dtype=torch.float32, device=weight.device))
            self.lora_b = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32, device=weight.device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as peft does
        self.lora_enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.rank > 0 and self.lora_enabled:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * w


def rope_tables(n_pos: int, head_dim: int, base: float, device):
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()  # [T, hd/2]


def apply_rope_interleaved(x, cos, sin):
    """x [B, H, T, D]; rotates pairs (2i, 2i+1) by angle pos * base^(-2i/D)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    return torch.stack((o0, o1), dim=-1).flatten(-2).to(x.dtype)


ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
MLP = ("ffn_gate", "ffn_up", "ffn_down")


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, w: dict, rank: int, alpha: float, mlp_rank: int = 0):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("attn_norm", w["attn_norm"], persistent=False)
        self.register_buffer("ffn_norm", w["ffn_norm"], persistent=False)
        self.attn_q = LoRALinear(w["attn_q"], rank, alpha)
        self.attn_k = LoRALinear(w["attn_k"], rank, alpha)
        self.attn_v = LoRALinear(w["attn_v"], rank, alpha)
        self.attn_output = LoRALinear(w["attn_output"], rank, alpha)
        # MLP LoRA (mlp_rank > 0) at the same scale alpha / rank as the attention's
        mlp_alpha = alpha / rank * mlp_rank if rank > 0 else 2.0 * mlp_rank
        self.ffn_gate = LoRALinear(w["ffn_gate"], mlp_rank, mlp_alpha)
        self.ffn_up = LoRALinear(w["ffn_up"], mlp_rank, mlp_alpha)
        self.ffn_down = LoRALinear(w["ffn_down"], mlp_rank, mlp_alpha)

    def forward(self, h, cos, sin, mask):
        cfg = self.cfg
        b, t, _ = h.shape
        hd = cfg.head_dim
        x = rms_norm(h, self.attn_norm, cfg.rms_eps)
        q = self.attn_q(x).view(b, t, cfg.n_heads, hd).transpose(1, 2)
        k = self.attn_k(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.attn_v(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        q = apply_rope_interleaved(q, cos, sin)
        k = apply_rope_interleaved(k, cos, sin)
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:  # query head j uses kv head j // rep
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, t, cfg.n_heads * hd)
        h = h + self.attn_output(a).float()
        x = rms_norm(h, self.ffn_norm, cfg.rms_eps)
        f = self.ffn_down(F.silu(self.ffn_gate(x)) * self.ffn_up(x))
        return h + f.float()


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict, rank: int = 0, alpha: float = 1.0, mlp_rank: int = 0,
                 embd_ids=None):
        """embd_ids: token ids whose embedding rows (input and tied output) are
        trained with the LoRA and stored in the adapter (the FIM tokens)."""
        super().__init__()
        self.cfg = cfg
        self.register_buffer("tok_embd", weights["token_embd"], persistent=False)
        self.register_buffer("out_norm", weights["output_norm"], persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg, {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"blk.{l}.")}, rank, alpha,
                  mlp_rank)
            for l in range(cfg.n_layers))
        self.rank = rank
        self.alpha = alpha
        self.mlp_rank = mlp_rank
        self.embd_ids = [int(i) for i in (embd_ids or [])]
        self.lora_on = True
        if self.embd_ids:
            e = self.tok_embd
            self.register_buffer("embd_index", torch.tensor(self.embd_ids, dtype=torch.long, device=e.device),
                                 persistent=False)
            self.register_buffer("embd_init", embd_init_rows(e, len(self.embd_ids)), persistent=False)
            self.embd_rows = nn.Parameter(self.embd_init.clone())
        self._rope = None

    def rope(self, t, device):
        if self._rope is None or self._rope[0].shape[0] < t or self._rope[0].device != device:
            self._rope = rope_tables(max(t, 1024), self.cfg.head_dim, self.cfg.rope_base, device)
        return self._rope[0][:t], self._rope[1][:t]

    def embedding(self):
        """The token embedding (also the tied output matrix), with the trained rows."""
        if not self.embd_ids or not self.lora_on:
            return self.tok_embd
        return torch.index_put(self.tok_embd, (self.embd_index,), self.embd_rows.to(self.tok_embd.dtype))

    def hidden(self, tokens, masks, n_layers=None, embd=None):
        """Final normed hidden states [B, T, dim]. masks: list (per layer) of bool
        [B,1,T,T] or None (dense causal)."""
        h = F.embedding(tokens, self.embedding() if embd is None else embd).float()
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        for l, blk in enumerate(self.blocks[:n_layers]):
            h = blk(h, cos, sin, masks[l])
        return rms_norm(h, self.out_norm, self.cfg.rms_eps)

    def forward(self, tokens, masks, n_layers=None):
        e = self.embedding()
        return F.linear(self.hidden(tokens, masks, n_layers, e), e)  # tied output

    def lora_parameters(self):
        """Everything the adapter trains: LoRA pairs and the embedding rows."""
        return [p for n, p in self.named_parameters() if "lora_" in n or n == "embd_rows"]

    def set_lora_enabled(self, on: bool):
        self.lora_on = on
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.lora_enabled = on

    def reset_lora(self, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        for m in self.modules():
            if isinstance(m, LoRALinear) and m.rank > 0:
                with torch.no_grad():
                    bound = 1.0 / math.sqrt(m.lora_a.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
                    m.lora_a.copy_((torch.rand(m.lora_a.shape, generator=g) * 2 - 1) * bound)
                    m.lora_b.zero_()
        if self.embd_ids:
            with torch.no_grad():
                self.embd_rows.copy_(self.embd_init)

    def lora_modules(self):
        """(name, LoRALinear) of every adapted weight, e.g. ("blk.0.attn_q", m)."""
        for l, blk in enumerate(self.blocks):
            for name in ATTN + MLP:
                m = getattr(blk, name)
                if m.rank > 0:
                    yield f"blk.{l}.{name}", m

    def lora_state(self) -> dict:
        """Adapter tensors named as the Rust engine expects (GGUF layout), and the
        trained embedding rows as `token_embd.rows` [len(embd_ids), dim] (their
        ids go in the metadata, `token_embd_rows`)."""
        out = {}
        for name, m in self.lora_modules():
            out[f"{name}.lora_a"] = m.lora_a.detach().float().cpu().contiguous()
            out[f"{name}.lora_b"] = m.lora_b.detach().float().cpu().contiguous()
        if self.embd_ids:
            out["token_embd.rows"] = self.embd_rows.detach().float().cpu().contiguous()
        return out

    def load_lora_state(self, state: dict):
        with torch.no_grad():
            for name, m in self.lora_modules():
                m.lora_a.copy_(state[f"{name}.lora_a"])
                m.lora_b.copy_(state[f"{name}.lora_b"])
            if self.embd_ids and "token_embd.rows" in state:
                self.embd_rows.copy_(state["token_embd.rows"])


def embd_init_rows(e: torch.Tensor, k: int) -> torch.Tensor:
    """Start values of k new token rows: the mean embedding plus a small, fixed,
    different perturbation per row (SmolLM2's issue-marker rows are untrained and
    identical to each other, so the roles must be told apart from the start)."""
    g = np.random.default_rng(1234)
    mean = e.float().mean(0)
    std = float(e.float().std())
    noise = torch.from_numpy(g.standard_normal((k, e.shape[1])).astype(np.float32)).to(e.device)
    return (mean[None, :] + 0.5 * std * noise).to(torch.float32)


def adapter_bytes(cfg: LlamaConfig, rank: int, mlp_rank: int = 0, n_embd_rows: int = 0, n_layers=None) -> int:
    """Size of the adapter's tensor data (float32), without the safetensors header."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attn = rank * ((d + q) + (d + kv) * 2 + (q + d))
    mlp = mlp_rank * ((d + cfg.ffn) * 2 + (cfg.ffn + d))
    return 4 * ((attn + mlp) * (n_layers or cfg.n_layers) + n_embd_rows * d)


def load_weights(g: GGUFFile, device="cpu", dtype=torch.float32, n_layers=None) -> tuple:
    cfg = llama_config(g)
    if n_layers is not None:
        cfg.n_layers = n_layers
    w = {}
    names = ["token_embd.weight", "output_norm.weight"]
    for l in range(cfg.n_layers):
        names += [f"blk.{l}.{n}.weight" for n in (
            "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    for name in names:
        a = g.tensor(name)
        key = name[:-len(".weight")]
        t = torch.from_numpy(np.ascontiguousarray(a))
        # norms stay float32; matrices in `dtype`
        t = t.to(device=device, dtype=torch.float32 if a.ndim == 1 else dtype)
        w[key] = t
    if "output.weight" in g.tensors:
        raise NotImplementedError("untied output.weight not supported (the default model ties it)")
    return cfg, w


def build_model(gguf_path: str, device="cpu", dtype=torch.float32, rank=0, alpha=1.0, n_layers=None, mlp_rank=0,
                embd_ids=None):
    g = GGUFFile(gguf_path)
    cfg, w = load_weights(g, device, dtype, n_layers)
    model = Llama(cfg, w, rank, alpha, mlp_rank, embd_ids).to(device)
    model.requires_grad_(False)
    for p in model.lora_parameters():
        p.requires_grad_(True)
    anchors = torch.from_numpy(anchor_table(g)).to(device)
    return g, model, anchors


def policy_masks(policy: Policy, anchor_lut, tokens, n_layers):
    return layer_masks_torch(policy, anchor_lut[tokens], n_layers)


@torch.no_grad()
def greedy(model, anchor_lut, policy: Policy, ids: list, n_new: int, device="cpu", autocast=None):
    ids = list(ids)
    for _ in range(n_new):
        x = torch.tensor([ids], device=device)
        masks = policy_masks(policy, anchor_lut, x, model.cfg.n_layers)
        if autocast:
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                logits = model(x, masks)
        else:
            logits = model(x, masks)
        ids.append(int(logits[0, -1].argmax()))
    return ids
