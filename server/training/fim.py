#!/usr/bin/env python3
"""Training rows in exactly the server's prompt layout, plain and fill-in-the-middle.

The server (server/src/completion.rs) builds, for a cursor in a document:

    cached prompt   <fim_prefix> + encode(text[window_start:cut])
    scratch tail    <fim_suffix> + encode(suffix)[:suffix_tokens] + <fim_middle>
    generated       the middle, spelling the healed bytes first, ending at EOS

where window_start is a line start (or 0), `cut` is the cursor less the bytes
that token healing cuts (heal_split below: the trailing identifier with its
space, run of spaces, or punctuation run of the cursor's line), and `suffix` is
the text after the cursor, at most suffix_tokens * 4 bytes and, when cut, cut
after its last newline (fim_tail). Without FIM (completion.fim off, or a model
without FIM tokens) the prompt is encode(text[window_start:cut]) alone. The
model has no BOS to add (SmolLM2: add_bos_token false). Positions start at 0
with the first token of the prompt; the first S tokens are the sinks.

SmolLM2 has no FIM tokens: FIM_TOKENS gives three of its special tokens that a
code completion never sends (the GitHub-issue markers, untrained rows in this
model) the FIM roles. The adapter stores their trained embedding rows and names
them in its metadata (`fim_tokens`); the engine's FIM detection uses them once
the adapter is merged (server/src/engine/adapter.rs).

A row holds seq_len + 1 tokens (inputs row[:-1], targets row[1:]):

  plain  encode(text[ws:]) from a line start ws of a file, continued across
         files with <|endoftext|> between them, as the recipe's streams are
  fim    <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <|endoftext|>
         then <|endoftext|> padding; the prefix starts at a line start and is as
         long as the row allows

Loss: every target except padding (positions >= valid) and the three FIM
markers themselves (the server feeds them, the model never has to say them).

CLI: build the rows from prepare_data.py's token streams (files are decoded
back to text: byte-level BPE round-trips exactly, and no file holds a special
token's text):

    python fim.py --data data --out data/rows2048 --seq-len 2048 --train-rows 8192 --val-rows 256 --xz

writes train_rows.npy[.xz] (uint16 [n, seq_len + 1]), train_info.npy (int32
[n, 3]: valid tokens, index of <fim_middle> or -1, 1 for FIM rows), the same
for val, and rows_meta.json (FIM token ids and names, shares, pad fraction).
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import lzma
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EOT = 0  # <|endoftext|>
# The FIM roles, named once. These are SmolLM2's ids 8, 9, 10 (control tokens,
# never produced by encoding a document, not end-of-generation tokens).
FIM_TOKENS = {"prefix": "<issue_start>", "suffix": "<issue_comment>", "middle": "<issue_closed>"}
FIM_ROLES = ("prefix", "suffix", "middle")
SUFFIX_TOKENS = 256  # completion.suffixTokens' default
MAX_HEAL = 64  # completion.rs: most bytes token healing cuts
KIND_PLAIN, KIND_FIM = 0, 1


def fim_ids(vocab: list, types: list | None = None) -> dict:
    """role -> id of FIM_TOKENS in a GGUF vocabulary (they must be control tokens)."""
    out = {}
    for role in FIM_ROLES:
        name = FIM_TOKENS[role]
        if name not in vocab:
            raise ValueError(f"FIM token {name!r} ({role}) is not in this vocabulary")
        i = vocab.index(name)
        if types is not None and types[i] != 3:
            raise ValueError(f"FIM token {name!r} is not a control token (type {types[i]})")
        out[role] = i
    return out


def fim_metadata(ids: dict) -> str:
    """The adapter's `fim_tokens` metadata (JSON): role -> {"id", "text"}."""
    return json.dumps({r: {"id": int(ids[r]), "text": FIM_TOKENS[r]} for r in FIM_ROLES}, sort_keys=True)


# -- the server's rules (completion.rs), on Python strings --------------------
def _class(c: str) -> int:
    if c.isalnum() or c == "_":
        return 0
    if c.isspace():
        return 1
    return 2


def heal_split(before: str) -> str:
    """completion.rs heal_split: the trailing identifier (with the space before
    it), run of spaces, or punctuation run of `before`."""
    if not before:
        return ""
    k = _class(before[-1])
    start = len(before)
    while start > 0 and _class(before[start - 1]) == k:
        start -= 1
    if k == 0 and start > 0 and before[start - 1] == " ":
        start -= 1
    return before[start:]


def healed_at(text: str, cursor: int, window_start: int = 0) -> str:
    """What plan() heals for a cursor (a str index): heal_split of the cursor's
    line, at most MAX_HEAL bytes back and never before the window."""
    line_begin = text.rfind("\n", 0, cursor) + 1
    lo = max(window_start, line_begin)
    # cursor - MAX_HEAL bytes, floored to a character boundary
    tail = text[lo:cursor].encode("utf-8")
    if len(tail) > MAX_HEAL:
        b = tail[len(tail) - MAX_HEAL:]
        while b and (b[0] & 0xC0) == 0x80:  # a continuation byte: floor to the character's start
            b = tail[len(tail) - len(b) - 1:]
        tail = b
    return heal_split(tail.decode("utf-8"))


def suffix_text(following: str, suffix_tokens: int = SUFFIX_TOKENS) -> str:
    """completion.rs fim_tail's text: at most suffix_tokens * 4 bytes, floored to
    a character boundary, and when cut, cut after its last newline."""
    raw = following.encode("utf-8")
    budget = suffix_tokens * 4
    if len(raw) <= budget:
        return following
    b = budget
    while b > 0 and (raw[b] & 0xC0) == 0x80:
        b -= 1
    text = raw[:b]
    nl = text.rfind(b"\n")
    if nl >= 0:
        text = text[: nl + 1]
    return text.decode("utf-8")


def fim_tail_ids(encode, following: str, ids: dict, suffix_tokens: int = SUFFIX_TOKENS) -> list:
    """completion.rs fim_tail: <fim_suffix> + suffix tokens + <fim_middle>."""
    suf = encode(suffix_text(following, suffix_tokens))[:suffix_tokens]
    return [ids["suffix"]] + suf + [ids["middle"]]


def line_starts(text: str) -> list:
    out = [0]
    i = text.find("\n")
    while i >= 0:
        if i + 1 < len(text):
            out.append(i + 1)
        i = text.find("\n", i + 1)
    return out


def fim_row(encode, text: str, c0: int, c1: int, ids: dict, row_len: int, suffix_tokens: int = SUFFIX_TOKENS,
            starts: list | None = None):
    """One FIM example: the document is text[:c0] + text[c1:] with the cursor at
    c0, and the model must write text[c0:c1]. Returns (row, valid, mid_index,
    prefix_text) with len(row) == row_len (padded with EOT), or None when the
    tail and middle alone do not fit."""
    healed = healed_at(text, c0)
    cut = c0 - len(healed)
    tail = fim_tail_ids(encode, text[c1:], ids, suffix_tokens)
    middle = encode(healed + text[c0:c1]) + [EOT]
    budget = row_len - 1 - len(tail) - len(middle)  # tokens left for the prefix text
    if budget < 1:
        return None
    starts = line_starts(text) if starts is None else starts
    # The window starts at the earliest line start ws <= cut whose text[ws:cut]
    # encodes to at most `budget` tokens (the count falls as ws moves on). A
    # token spans at most a few bytes of code, so lines more than 16 bytes a
    # token back are never candidates (a bound that saves encoding whole files).
    hi = bisect.bisect_right(starts, cut) - 1
    lo = min(hi, bisect.bisect_left(starts, cut - 16 * budget))
    cache = {}

    def count(k):
        if k not in cache:
            cache[k] = encode(text[starts[k]:cut])
        return cache[k]

    if len(count(hi)) > budget:
        return None  # the cursor's line alone is longer than the row allows
    while lo < hi:
        mid = (lo + hi) // 2
        if len(count(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    best = hi
    prefix = count(best)
    row = [ids["prefix"]] + prefix + tail + middle
    valid = len(row)
    mid_index = 1 + len(prefix) + len(tail) - 1
    assert row[mid_index] == ids["middle"]
    row += [EOT] * (row_len - valid)
    return row, valid, mid_index, text[starts[best]:cut]


def pick_middle(rng, text: str, lo: int = 0):
    """A cursor c0 >= lo and the end c1 of what the model must write, as an
    editor sees them: the rest of a line (multi-line mode: nothing after the
    cursor), part of a line (single-line mode: text after the cursor), one to
    eight whole lines, or through the end of the file."""
    n = len(text)
    if n < 2:
        return None
    c0 = int(rng.integers(min(lo, n - 1), n))
    line_end = text.find("\n", c0)
    line_end = n if line_end < 0 else line_end
    r = rng.random()
    if r < 0.35:  # the rest of the cursor's line
        c1 = line_end
    elif r < 0.65:  # part of the line: the suggestion is one line, the rest stays after the cursor
        c1 = int(rng.integers(c0, line_end + 1))
    elif r < 0.95:  # 1..8 lines, ending at a line end
        c1 = line_end
        for _ in range(int(rng.integers(1, 9))):
            nxt = text.find("\n", c1 + 1)
            if nxt < 0:
                c1 = n
                break
            c1 = nxt
    else:  # to the end of the file: empty suffix
        c1 = n
    # the middle is at most ~600 bytes (a completion is short: max_tokens 64 by default)
    if c1 - c0 > 600:
        c1 = text.rfind("\n", c0, c0 + 600)
        c1 = c0 + 600 if c1 <= c0 else c1
    return c0, c1


def split_files(stream: np.ndarray) -> list:
    """The token stream of prepare_data.py (files each followed by EOT) -> per-file token arrays."""
    ends = np.flatnonzero(stream == EOT)
    out, s = [], 0
    for e in ends:
        if e > s:
            out.append(stream[s:e])
        s = e + 1
    if s < len(stream):
        out.append(stream[s:])
    return out


class RowBuilder:
    """Builds rows from files (token arrays) with a tokenizer (`tokenizers`)."""

    def __init__(self, tok, files: list, ids: dict, row_len: int, suffix_tokens: int = SUFFIX_TOKENS):
        self.tok = tok
        self.files = files
        self.ids = ids
        self.row_len = row_len
        self.suffix_tokens = suffix_tokens
        self.sizes = np.array([len(f) for f in files], dtype=np.int64)
        self.texts: dict = {}
        self.long = np.flatnonzero(self.sizes >= row_len)  # files that can fill a FIM row

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def text(self, i: int) -> str:
        if i not in self.texts:
            self.texts[i] = self.tok.decode(self.files[i].tolist(), skip_special_tokens=False)
            if len(self.texts) > 4096:
                self.texts.pop(next(iter(self.texts)))
        return self.texts[i]

    def plain(self, rng):
        """Text from a line start of a file (chosen by size), continued across files."""
        i = int(rng.choice(len(self.files), p=self.sizes / self.sizes.sum()))
        text = self.text(i)
        starts = line_starts(text)
        ws = starts[int(rng.integers(0, len(starts)))]
        ids = self.encode(text[ws:ws + self.row_len * 8])
        if len(ids) < self.row_len + 32 and ws + self.row_len * 8 < len(text):
            ids = self.encode(text[ws:])  # the cut at row_len * 8 characters must not reach the row
        row = ids[: self.row_len]
        j = i
        while len(row) < self.row_len:
            row.append(EOT)
            j = (j + 1) % len(self.files)
            row.extend(self.files[j][: self.row_len - len(row)].tolist())
        return row[: self.row_len], self.row_len, -1

    def fim(self, rng, long_share: float = 0.9):
        """A FIM row; long_share of them from files that fill the row (cursor late
        enough that the prefix does), the rest from any file (short documents:
        padded rows)."""
        for _ in range(20):
            if len(self.long) and rng.random() < long_share:
                i = int(self.long[rng.integers(0, len(self.long))])
            else:
                i = int(rng.choice(len(self.files), p=self.sizes / self.sizes.sum()))
            text = self.text(i)
            # a cursor late enough that the prefix fills most of the row (in long files)
            lo = int(len(text) * max(0.0, (self.row_len - 64) / max(1, self.sizes[i])))
            lo = lo if lo < len(text) - 1 else 0
            pm = pick_middle(rng, text, lo)
            if pm is None:
                continue
            r = fim_row(self.encode, text, pm[0], pm[1], self.ids, self.row_len, self.suffix_tokens)
            if r is not None:
                return r[0], r[1], r[2]
        raise RuntimeError("could not place a FIM example in 20 tries")

    def build(self, n_rows: int, fim_share: float, seed: int):
        rng = np.random.default_rng(seed)
        rows = np.empty((n_rows, self.row_len), dtype=np.uint16)
        info = np.empty((n_rows, 3), dtype=np.int32)
        for k in range(n_rows):
            if rng.random() < fim_share:
                row, valid, mid = self.fim(rng)
                kind = KIND_FIM
            else:
                row, valid, mid = self.plain(rng)
                kind = KIND_PLAIN
            rows[k] = row
            info[k] = (valid, mid, kind)
        return rows, info


def loss_mask(rows: np.ndarray, info: np.ndarray, ids: dict) -> np.ndarray:
    """[n, row_len - 1] bool: which targets row[:, 1:] are trained."""
    t = rows[:, 1:].astype(np.int64)
    pos = np.arange(1, rows.shape[1])[None, :]
    m = pos < info[:, :1]
    for r in FIM_ROLES:
        m &= t != ids[r]
    return m


def middle_mask(rows: np.ndarray, info: np.ndarray) -> np.ndarray:
    """[n, row_len - 1] bool: targets that are the middle of a FIM row (and its EOT)."""
    pos = np.arange(1, rows.shape[1])[None, :]
    mid = info[:, 1:2]
    return (info[:, 2:3] == KIND_FIM) & (pos > mid) & (pos < info[:, :1])


def save_array(path_stem: str, arr: np.ndarray, xz: bool):
    for stale in (path_stem + ".npy", path_stem + ".npy.xz"):
        if os.path.exists(stale):
            os.remove(stale)
    if xz:
        with lzma.open(path_stem + ".npy.xz", "wb", preset=6) as f:
            np.save(f, arr)
        return path_stem + ".npy.xz"
    np.save(path_stem + ".npy", arr)
    return path_stem + ".npy"


def load_array(path_stem: str) -> np.ndarray:
    if os.path.exists(path_stem + ".npy"):
        return np.load(path_stem + ".npy")
    with lzma.open(path_stem + ".npy.xz", "rb") as f:
        return np.load(f)


def has_rows(d: str) -> bool:
    return os.path.exists(os.path.join(d, "rows_meta.json"))


def main(argv=None):
    from gguf_io import GGUFFile
    from prepare_data import DEFAULT_GGUF, load_tokens
    from tokenizer import build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                    help="prepare_data.py's output (train.npy[.xz], val.npy[.xz])")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048, help="inputs per row (rows hold seq_len + 1 tokens)")
    ap.add_argument("--train-rows", type=int, default=8192)
    ap.add_argument("--val-rows", type=int, default=256)
    ap.add_argument("--fim-share", type=float, default=0.5)
    ap.add_argument("--suffix-tokens", type=int, default=SUFFIX_TOKENS)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--xz", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.time()
    g = GGUFFile(args.gguf)
    tok = build_tokenizer(g)
    ids = fim_ids(g.metadata["tokenizer.ggml.tokens"], g.metadata["tokenizer.ggml.token_type"])
    os.makedirs(args.out, exist_ok=True)
    meta = {"seq_len": args.seq_len, "row_len": args.seq_len + 1, "fim_share": args.fim_share,
            "suffix_tokens": args.suffix_tokens, "fim_tokens": json.loads(fim_metadata(ids)),
            "fim_ids": ids, "eot": EOT, "gguf": os.path.basename(args.gguf), "seed": args.seed, "splits": {}}
    for split, n, seed in (("train", args.train_rows, args.seed), ("val", args.val_rows, args.seed + 1)):
        files = split_files(load_tokens(os.path.join(args.data, split)))
        b = RowBuilder(tok, files, ids, args.seq_len + 1, args.suffix_tokens)
        rows, info = b.build(n, args.fim_share, seed)
        path = save_array(os.path.join(args.out, f"{split}_rows"), rows, args.xz)
        np.save(os.path.join(args.out, f"{split}_info.npy"), info)
        fim = info[:, 2] == KIND_FIM
        pad = float((rows.shape[1] - info[:, 0]).sum() / rows.size)
        meta["splits"][split] = {"rows": int(n), "fim_rows": int(fim.sum()), "files": len(files),
                                 "pad_fraction": round(pad, 4),
                                 "mean_middle_tokens": round(float((info[fim, 0] - info[fim, 1] - 1).mean()), 1)
                                 if fim.any() else 0,
                                 "sha1": hashlib.sha1(rows.tobytes()).hexdigest(),
                                 "bytes": os.path.getsize(path)}
        print(f"{split}: {n} rows of {args.seq_len + 1} ({int(fim.sum())} FIM), pad {pad:.2%}, "
              f"{os.path.getsize(path) / 2**20:.2f} MiB -> {path}", flush=True)
    with open(os.path.join(args.out, "rows_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
