"""Minimal GGUF reader and dequantizer in pure Python + numpy.

No dependency on the `gguf` package (it is not installed on the GPU machine).
Supports the tensor types of the default model: F32, F16, Q8_0, Q4_0, Q4_1.
Tested against `gguf.GGUFReader` + `gguf.quants.dequantize` in test_gguf_io.py.

Shapes follow the usual row-major convention: a GGUF tensor with
ne = [ne0, ne1] (ne0 fastest) is returned as an array of shape (ne1, ne0),
i.e. a weight matrix comes back as W[out, in] with y = W @ x, exactly the
layout llama.cpp and candle use (for attn_q / attn_k this is AFTER the
convert script's RoPE permutation: rows of a head are interleaved pairs).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 0, 1, 2, 3, 8
TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1", GGML_Q8_0: "Q8_0"}
# (values per block, bytes per block)
BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i",
           _F32: "<f", _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}


@dataclass
class TensorInfo:
    name: str
    ne: tuple  # GGUF order, ne[0] fastest
    ggml_type: int
    offset: int  # absolute offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple:
        return tuple(reversed(self.ne))


class GGUFFile:
    """Parses the header; tensors are read lazily from a memory map."""

    def __init__(self, path: str):
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        magic = bytes(self.buf[0:4])
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")
        self.pos = 4
        self.version = self._u32()
        if self.version < 2:
            raise ValueError(f"GGUF version {self.version} not supported")
        n_tensors = self._u64()
        n_kv = self._u64()
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u32()
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u32()
            ne = tuple(self._u64() for _ in range(n_dims))
            ttype = self._u32()
            off = self._u64()
            infos.append((name, ne, ttype, off))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ttype, off in infos:
            if ttype not in BLOCK:
                raise ValueError(f"tensor {name}: ggml type {ttype} not supported")
            n = int(np.prod(ne))
            per, nb = BLOCK[ttype]
            self.tensors[name] = TensorInfo(name, ne, ttype, data_start + off, n // per * nb)
        self.data_start = data_start

    # -- header primitives -------------------------------------------------
    def _take(self, n: int) -> bytes:
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def _u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def _u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def _str(self) -> str:
        n = self._u64()
        return self._take(n).decode("utf-8", errors="surrogateescape")

    def _value(self, vtype: int):
        if vtype == _STR:
            return self._str()
        if vtype == _ARR:
            itype = self._u32()
            n = self._u64()
            if itype in _SCALAR and itype != _BOOL:
                fmt = _SCALAR[itype]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(self._take(n * size), dtype=np.dtype(fmt))
                return arr.tolist()
            return [self._value(itype) for _ in range(n)]
        fmt = _SCALAR[vtype]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    # -- tensors -----------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(self.buf[t.offset:t.offset + t.n_bytes])

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 array of shape (ne[-1], ..., ne[0])."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.ggml_type, t.shape)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if ggml_type == GGML_F32:
        out = raw.view("<f4").astype(np.float32)
    elif ggml_type == GGML_F16:
        out = raw.view("<f2").astype(np.float32)
    elif ggml_type == GGML_Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (nb, 32)
        out = d * q
    elif ggml_type in (GGML_Q4_0, GGML_Q4_1):
        bs = 18 if ggml_type == GGML_Q4_0 else 20
        blocks = raw.reshape(-1, bs)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        qs = blocks[:, bs - 16:]
        # element j (0..15) is the low nibble of byte j, element j+16 the high nibble
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        if ggml_type == GGML_Q4_0:
            out = d * (q - 8.0)
        else:
            m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
            out = d * q + m
    else:
        raise ValueError(f"ggml type {ggml_type} not supported")
    return out.reshape(shape)


# -- llama hyper-parameters --------------------------------------------------
@dataclass
class LlamaConfig:
    n_layers: int
    dim: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    rope_base: float
    rms_eps: float
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_config(g: GGUFFile) -> LlamaConfig:
    md = g.metadata
    arch = md["general.architecture"]
    if arch != "llama":
        raise ValueError(f"architecture {arch} not supported")
    vocab = md.get("llama.vocab_size") or len(md["tokenizer.ggml.tokens"])
    return LlamaConfig(
        n_layers=int(md["llama.block_count"]),
        dim=int(md["llama.embedding_length"]),
        ffn=int(md["llama.feed_forward_length"]),
        n_heads=int(md["llama.attention.head_count"]),
        n_kv_heads=int(md.get("llama.attention.head_count_kv", md["llama.attention.head_count"])),
        rope_base=float(md.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(md["llama.attention.layer_norm_rms_epsilon"]),
        vocab=int(vocab),
    )


# -- byte-level vocabulary ---------------------------------------------------
def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable unicode char table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_U2B = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokens: list, token_types: list | None = None) -> list:
    """Bytes of each token of a byte-level BPE vocabulary (GGUF `gpt2` model).

    Control tokens (type 3, e.g. <|im_start|>) are returned as their UTF-8 text.
    """
    out = []
    for i, t in enumerate(tokens):
        if token_types is not None and token_types[i] == 3:
            out.append(t.encode("utf-8"))
            continue
        try:
            out.append(bytes(_U2B[c] for c in t))
        except KeyError:
            out.append(t.encode("utf-8"))
    return out


def anchor_table(g: GGUFFile) -> np.ndarray:
    """bool[vocab]: whether the token's decoded bytes contain a newline byte."""
    toks = g.metadata["tokenizer.ggml.tokens"]
    types = g.metadata.get("tokenizer.ggml.token_type")
    return np.array([b"\n" in b for b in token_bytes(toks, types)], dtype=bool)
