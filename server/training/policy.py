"""Attention policies: which earlier tokens each token may attend to, per layer.

This MUST match the Rust engine (server/src/engine/policy.rs) exactly:

- tokens are indexed 0..n; a token is an ANCHOR if its decoded bytes contain a
  '\\n' byte; line(i) = number of anchors strictly before i (an anchor belongs to
  the line it ends);
- sinks: tokens with index < S (sink_tokens);
- layer kinds:
    DENSE:          j <= i
    ANCHOR(R):      j <= i and (j < S or anchor(j) or line(i) - line(j) <= R)
    WINDOW(W):      j <= i and (j < S or i - j < W)
- policy "anchor" with dense_every D: layer l is DENSE if D > 0 and l % D == 0,
  else ANCHOR(R); policy "full": all DENSE; policy "window": all WINDOW(W).

Masks are boolean, True = "query i may attend to key j" (torch SDPA's convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE, ANCHOR, WINDOW = "dense", "anchor", "window"


@dataclass(frozen=True)
class Policy:
    name: str = "anchor"  # anchor | full | window
    recent_lines: int = 0
    sink_tokens: int = 4
    dense_every: int = 0
    window_tokens: int = 0

    def __post_init__(self):
        if self.name not in ("anchor", "full", "window"):
            raise ValueError(f"unknown attention policy {self.name!r} (expected anchor, full or window)")
        if self.name == "window" and self.window_tokens <= 0:
            raise ValueError("the window policy needs window_tokens > 0")
        for k in ("recent_lines", "sink_tokens", "dense_every", "window_tokens"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")

    def layer(self, l: int) -> tuple:
        """(kind, parameter) of layer l."""
        if self.name == "full":
            return (DENSE, 0)
        if self.name == "window":
            return (WINDOW, self.window_tokens)
        if self.dense_every > 0 and l % self.dense_every == 0:
            return (DENSE, 0)
        return (ANCHOR, self.recent_lines)

    def describe(self) -> str:
        """Same text as the engine's AttentionPolicy::describe."""
        if self.name == "full":
            return "full"
        if self.name == "anchor":
            return f"anchor(R={self.recent_lines}, S={self.sink_tokens}, dense_every={self.dense_every})"
        return f"window(W={self.window_tokens}, S={self.sink_tokens})"

    def to_json(self) -> dict:
        """Same keys as the engine's AttentionPolicy::to_json."""
        return {
            "policy": self.name,
            "recentLines": self.recent_lines if self.name == "anchor" else None,
            "denseEvery": self.dense_every if self.name == "anchor" else None,
            "windowTokens": self.window_tokens if self.name == "window" else None,
            "sinkTokens": self.sink_tokens,
        }


def lines_of(anchors: np.ndarray) -> np.ndarray:
    """line(i) = number of anchors strictly before i. Works on [..., T]."""
    a = np.asarray(anchors, dtype=np.int64)
    return np.cumsum(a, axis=-1) - a


def mask_numpy(anchors, kind: str, param: int, sinks: int) -> np.ndarray:
    """Reference mask [T, T] (bool) for one sequence, straight from the definition."""
    anchors = np.asarray(anchors, dtype=bool)
    t = anchors.shape[0]
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    causal = j <= i
    if kind == DENSE:
        return causal
    sink = j < sinks
    if kind == ANCHOR:
        line = lines_of(anchors)
        return causal & (sink | anchors[None, :] | (line[:, None] - line[None, :] <= param))
    if kind == WINDOW:
        return causal & (sink | (i - j < param))
    raise ValueError(kind)


def mask_slow(anchors, kind: str, param: int, sinks: int) -> np.ndarray:
    """Loop version, a transliteration of the engine's `LayerAttention::allows`."""
    anchors = [bool(a) for a in anchors]
    line, lines = 0, []
    for a in anchors:
        lines.append(line)
        line += int(a)
    t = len(anchors)
    m = np.zeros((t, t), dtype=bool)
    for q in range(t):
        for k in range(t):
            if k > q:
                continue
            if kind == DENSE:
                ok = True
            elif kind == ANCHOR:
                ok = k < sinks or anchors[k] or lines[q] - lines[k] <= param
            else:
                ok = k < sinks or q - k < param
            m[q, k] = ok
    return m


def policy_masks_numpy(policy: Policy, anchors, n_layers: int) -> list:
    return [mask_numpy(anchors, *policy.layer(l), policy.sink_tokens) for l in range(n_layers)]


# -- torch versions (batched, on any device) ---------------------------------
def mask_torch(anchors, kind: str, param: int, sinks: int):
    """Batched mask [B, 1, T, T] (bool) from anchor flags [B, T]; None for DENSE
    (the caller then uses is_causal=True, which is the same mask)."""
    import torch

    if kind == DENSE:
        return None
    b, t = anchors.shape
    dev = anchors.device
    i = torch.arange(t, device=dev)[:, None]
    j = torch.arange(t, device=dev)[None, :]
    base = (j <= i)
    sink = (j < sinks)
    if kind == ANCHOR:
        a = anchors.to(torch.int32)
        line = torch.cumsum(a, dim=-1) - a  # [B, T]
        near = (line[:, :, None] - line[:, None, :]) <= param  # [B, T, T]
        m = base & (sink | anchors[:, None, :].bool() | near)
        return m[:, None]
    if kind == WINDOW:
        m = base & (sink | ((i - j) < param))
        return m[None, None].expand(b, 1, t, t)
    raise ValueError(kind)


def layer_masks_torch(policy: Policy, anchors, n_layers: int) -> list:
    """One entry per layer (None = dense causal); layers of the same kind share a tensor."""
    cache: dict = {}
    out = []
    for l in range(n_layers):
        key = policy.layer(l)
        if key not in cache:
            cache[key] = mask_torch(anchors, key[0], key[1], policy.sink_tokens)
        out.append(cache[key])
    return out


def kv_fraction(policy: Policy, anchors, n_layers: int) -> float:
    """Fraction of the dense KV cache the policy keeps at the END of the sequence
    (what the engine's cache holds for the next token), averaged over layers."""
    anchors = np.asarray(anchors, dtype=bool)
    t = len(anchors)
    line = lines_of(anchors)
    next_line = line[-1] + int(anchors[-1])
    kept = 0
    for l in range(n_layers):
        kind, p = policy.layer(l)
        j = np.arange(t)
        if kind == DENSE:
            kept += t
        elif kind == ANCHOR:
            kept += int(((j < policy.sink_tokens) | anchors | (next_line - line <= p)).sum())
        else:
            kept += int(((j < policy.sink_tokens) | (t - j < p)).sum())
    return kept / (t * n_layers)
