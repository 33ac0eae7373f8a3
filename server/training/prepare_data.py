#!/usr/bin/env python3
"""Build the training / validation token streams from real code on this machine.

Sources (all present on a developer machine of this project):
  py: the Python standard library (sysconfig's stdlib path, site-packages excluded)
  rs: Rust crate sources under ~/.cargo/registry/src/*/
  js: npm's own JavaScript (the npm package directory next to the `npm` binary)

Tokenized with the default model's tokenizer (tokenizer.py, built from the GGUF).
Each file becomes its tokens followed by <|endoftext|> (id 0); files are
concatenated into one uint16 stream; train.py cuts it into rows of --seq-len.

Validation holds out WHOLE files, chosen by a hash of the file's source-relative
path (sha1(path) % 100 < --val-percent; for Rust the path leaves the crate
version out, and only the newest version of each crate is used), so the split is deterministic and
independent of what else is on the machine. Files are taken in a deterministic
order (sha1 of "order:" + path) until each language's share of --max-tokens is
reached.

Writes OUT/train.npy, OUT/val.npy (uint16, 1-D) and OUT/meta.json; with --xz,
train.npy.xz / val.npy.xz instead (smaller carry to the GPU machine).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import sysconfig
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_io import GGUFFile  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

DEFAULT_GGUF = os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf")
EOT = 0  # <|endoftext|>

# generated / giant Rust crates: bindings tables, not code people write
RS_SKIP_CRATES = ("windows-sys", "windows_", "windows-", "linux-raw-sys", "libc-", "web-sys", "js-sys",
                  "unicode-", "encoding_rs", "icu_", "tzdb", "chrono-tz", "phf_codegen")


def h(s: str) -> int:
    return int(hashlib.sha1(s.encode("utf-8")).hexdigest(), 16)


def find_sources() -> dict:
    """language -> list of (relpath, abspath), sorted."""
    out = {"py": [], "rs": [], "js": []}
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "dist-packages"))
        for f in sorted(files):
            if f.endswith(".py"):
                p = os.path.join(root, f)
                out["py"].append(("py/" + os.path.relpath(p, stdlib), p))
    # newest version of each crate only (several versions = near-duplicate files)
    newest: dict = {}
    for reg in sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))):
        for crate in sorted(os.listdir(reg)):
            m = re.match(r"^(.*?)-(\d+)\.(\d+)\.(\d+)(.*)$", crate)
            if not m or crate.startswith(RS_SKIP_CRATES):
                continue
            key = (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5))
            if m.group(1) not in newest or key > newest[m.group(1)][0]:
                newest[m.group(1)] = (key, os.path.join(reg, crate))
    for name in sorted(newest):
        crate_dir = newest[name][1]
        for root, dirs, files in os.walk(crate_dir):
            dirs[:] = sorted(d for d in dirs if d not in ("target", ".git"))
            for f in sorted(files):
                if f.endswith(".rs"):
                    p = os.path.join(root, f)
                    # the split/ordering key leaves the version out
                    out["rs"].append((f"rs/{name}/" + os.path.relpath(p, crate_dir), p))
    npm = shutil.which("npm")
    if npm:
        real = os.path.realpath(npm)  # .../node_modules/npm/bin/npm-cli.js
        npm_dir = real
        while npm_dir != "/" and os.path.basename(npm_dir) != "npm":
            npm_dir = os.path.dirname(npm_dir)
        if os.path.basename(npm_dir) == "npm":
            for root, dirs, files in os.walk(npm_dir):
                dirs[:] = sorted(dirs)
                for f in sorted(files):
                    if f.endswith((".js", ".cjs", ".mjs")):
                        p = os.path.join(root, f)
                        out["js"].append(("js/" + os.path.relpath(p, os.path.dirname(npm_dir)), p))
    return out


def acceptable(text: str, specials: list, max_bytes: int) -> bool:
    if not text.strip() or len(text.encode("utf-8")) > max_bytes:
        return False
    if any(s in text for s in specials):
        return False  # would tokenize as control tokens
    lines = text.split("\n")
    if max(len(l) for l in lines) > 400:  # minified / generated data tables
        return False
    if len(text) / max(1, len(lines)) > 120:
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--max-tokens", type=int, default=12_000_000, help="training tokens in total")
    ap.add_argument("--max-val-tokens", type=int, default=300_000)
    ap.add_argument("--mix", default="py=0.45,rs=0.40,js=0.15", help="share of each language")
    ap.add_argument("--val-percent", type=int, default=5)
    ap.add_argument("--max-file-bytes", type=int, default=150_000)
    ap.add_argument("--xz", action="store_true", help="write .npy.xz (for the GPU carry)")
    args = ap.parse_args(argv)

    t0 = time.time()
    g = GGUFFile(args.gguf)
    tok = build_tokenizer(g)
    toks = g.metadata["tokenizer.ggml.tokens"]
    types = g.metadata["tokenizer.ggml.token_type"]
    specials = [toks[i] for i in range(len(toks)) if types[i] == 3]
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    total_share = sum(mix.values())
    sources = find_sources()

    streams = {"train": [], "val": []}
    seen: set = set()
    meta = {"gguf": os.path.basename(args.gguf), "eot": EOT, "languages": {}, "val_files": [], "args": vars(args)}
    for lang, files in sources.items():
        share = mix.get(lang, 0.0) / total_share
        budget = {"train": int(args.max_tokens * share), "val": int(args.max_val_tokens * share)}
        used = {"train": 0, "val": 0}
        nfiles = {"train": 0, "val": 0}
        skipped = 0
        order = sorted(files, key=lambda f: h("order:" + f[0]))
        batch: list = []

        def flush():
            if not batch:
                return
            encs = tok.encode_batch([t for _, _, t in batch], add_special_tokens=False)
            for (rel, split, _), e in zip(batch, encs):
                if used[split] >= budget[split]:
                    continue
                ids = e.ids + [EOT]
                streams[split].append(np.asarray(ids, dtype=np.uint16))
                used[split] += len(ids)
                nfiles[split] += 1
                if split == "val":
                    meta["val_files"].append(rel)
            batch.clear()

        for rel, path in order:
            split = "val" if h(rel) % 100 < args.val_percent else "train"
            if used["train"] >= budget["train"] and used["val"] >= budget["val"]:
                break
            if used[split] >= budget[split]:
                continue
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if not acceptable(text, specials, args.max_file_bytes):
                skipped += 1
                continue
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            if digest in seen:  # exact duplicate of a file already taken
                skipped += 1
                continue
            seen.add(digest)
            batch.append((rel, split, text))
            if len(batch) >= 64:
                flush()
        flush()
        meta["languages"][lang] = {"files_found": len(files), "skipped": skipped,
                                   "train_files": nfiles["train"], "train_tokens": used["train"],
                                   "val_files": nfiles["val"], "val_tokens": used["val"]}
        print(f"{lang}: {len(files)} files found, {skipped} skipped; train {nfiles['train']} files "
              f"{used['train']:,} tokens; val {nfiles['val']} files {used['val']:,} tokens", flush=True)

    os.makedirs(args.out, exist_ok=True)
    for split in ("train", "val"):
        arr = np.concatenate(streams[split]) if streams[split] else np.zeros(0, np.uint16)
        # deterministic shuffle of whole files already done by the order; keep as is
        for stale in (f"{split}.npy", f"{split}.npy.xz"):
            if os.path.exists(os.path.join(args.out, stale)):
                os.remove(os.path.join(args.out, stale))
        if args.xz:
            path = os.path.join(args.out, f"{split}.npy.xz")
            with lzma.open(path, "wb", preset=6) as f:
                np.save(f, arr)
        else:
            path = os.path.join(args.out, f"{split}.npy")
            np.save(path, arr)
        meta[f"{split}_tokens"] = int(arr.size)
        meta[f"{split}_sha1"] = hashlib.sha1(arr.tobytes()).hexdigest()
        print(f"{split}: {arr.size:,} tokens -> {path} ({os.path.getsize(path) / 2**20:.2f} MiB)", flush=True)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"done in {time.time() - t0:.1f}s")


def load_tokens(path_stem: str) -> np.ndarray:
    """Load DIR/train (tries .npy then .npy.xz)."""
    if os.path.exists(path_stem + ".npy"):
        return np.load(path_stem + ".npy")
    with lzma.open(path_stem + ".npy.xz", "rb") as f:
        return np.load(f)


if __name__ == "__main__":
    main()
