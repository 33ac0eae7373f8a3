#!/usr/bin/env python3
"""Lay out what travels to the GPU machine, in carries that each fit one call.

The device tool copies at most 64 MiB per call: the whole working tree (tracked
files, untracked-not-ignored files; 16.6 MiB today, most of it the two adapters
in server/assets) travels with EVERY call, plus the carried paths. The base
model alone is 93.8 MiB (98,362,432 bytes) and does not compress (xz -6: 86.3
MiB), and a lossy copy would train the adapter against a different base than
the one the engine loads. So the GGUF travels byte-exact, in parts:

  carry/a/   gguf.part0 + manifest.json                  -> `gpu_run.sh stash`
  carry/b/   gguf.part1 + manifest.json                  -> `gpu_run.sh stash`   (when 3 calls)
  carry/c/   last part + training data + manifest.json   -> `gpu_run.sh train`

with as few calls as fit (3 with today's tree and ~6 MiB of rows; 2 when the
tree is small). Each `stash` call copies its part to /tmp/anchorcoder-stash on
the (warm) machine; `train` joins the parts, checks the SHA-256 of the whole
GGUF, and trains. All calls must land on the same warm machine (it is given
back after 30 s idle). The parts are balanced so that every call has the same
headroom.

The training data is fim.py's prebuilt rows (--data data/rows2048: train_rows,
train_info, val_rows, val_info, rows_meta.json) or prepare_data.py's streams
(--data data: train, val, meta.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

MIB = 2 ** 20
LIMIT = 64 * MIB
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GGUF = os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def sha256(path: str, start: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length if length is not None else os.path.getsize(path) - start
        while left > 0:
            b = f.read(min(left, 8 * MIB))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def tree_bytes(repo: str) -> int:
    """Bytes of what travels besides the carries: tracked + untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except Exception:
        return 0
    tot = 0
    for rel in out.split(b"\0"):
        if rel:
            p = os.path.join(repo.encode(), rel)
            if os.path.isfile(p) and not os.path.islink(p):
                tot += os.path.getsize(p)
    return tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--data", default=os.path.join(HERE, "data", "rows2048"))
    ap.add_argument("--out", default=os.path.join(HERE, "carry"))
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(HERE, "..", "..")))
    ap.add_argument("--margin-mib", type=float, default=2.0, help="headroom left in each call for the repo growing")
    args = ap.parse_args(argv)

    gsize = os.path.getsize(args.gguf)
    data_files = []
    rows = os.path.exists(os.path.join(args.data, "rows_meta.json"))  # fim.py's prebuilt rows
    for stem in (("train_rows", "val_rows") if rows else ("train", "val")):
        for ext in (".npy.xz", ".npy"):
            p = os.path.join(args.data, stem + ext)
            if os.path.exists(p):
                data_files.append(p)
                break
        else:
            sys.exit(f"no {stem}.npy[.xz] in {args.data}: run " + ("fim.py --xz" if rows else "prepare_data.py --xz")
                     + " first")
    for extra in (("train_info.npy", "val_info.npy", "rows_meta.json") if rows else ("meta.json",)):
        meta = os.path.join(args.data, extra)
        if os.path.exists(meta):
            data_files.append(meta)
        elif rows:
            sys.exit(f"{meta} missing: run fim.py again")
    dsize = sum(os.path.getsize(p) for p in data_files)
    tree = tree_bytes(args.repo)
    code = 8192  # the manifests

    print(f"GGUF {gsize:,} B ({gsize / MIB:.2f} MiB); data {dsize:,} B ({dsize / MIB:.2f} MiB); "
          f"working tree besides carries {tree:,} B ({tree / MIB:.2f} MiB); limit per call {LIMIT / MIB:.0f} MiB")
    margin = args.margin_mib * MIB
    # The fewest calls whose carries, balanced, each fit with the margin: the
    # GGUF in n byte-exact parts, the last call with the last part and the data.
    n = 1
    while tree + code + -(-(gsize + dsize) // n) + margin > LIMIT:
        n += 1
        if n > 6 or tree + code + margin + dsize > LIMIT:
            sys.exit("does not fit: lower --train-rows in fim.py (or shrink the working tree)")
    if n > 26:
        sys.exit("too many calls")
    share = (gsize + dsize) // n
    sizes = [share] * (n - 1) + [gsize - share * (n - 1)]
    if sizes[-1] < 0:
        sys.exit("the data alone is larger than one call's share: lower --train-rows in fim.py")
    names = [chr(ord("a") + k) for k in range(n)]
    calls = [tree + code + s + (dsize if k == n - 1 else 0) for k, s in enumerate(sizes)]
    print(f"{n} calls: " + ", ".join(f"{nm} {c / MIB:.2f} MiB" for nm, c in zip(names, calls)))

    whole = sha256(args.gguf)
    parts, off = [], 0
    for k, s in enumerate(sizes):
        parts.append({"name": f"gguf.part{k}", "carry": names[k], "offset": off, "bytes": s,
                      "sha256": sha256(args.gguf, off, s)})
        off += s
    manifest = {"gguf_name": os.path.basename(args.gguf), "gguf_bytes": gsize, "gguf_sha256": whole,
                "parts": parts, "data_carry": names[-1]}
    shutil.rmtree(args.out, ignore_errors=True)
    dirs = [os.path.join(args.out, nm) for nm in names]
    for d in dirs:
        os.makedirs(d)
    with open(args.gguf, "rb") as src:
        for d, p in zip(dirs, parts):
            with open(os.path.join(d, p["name"]), "wb") as f:
                left = p["bytes"]
                while left:
                    b = src.read(min(left, 8 * MIB))
                    f.write(b)
                    left -= len(b)
    for p in data_files:
        shutil.copy(p, dirs[-1])
    for d in dirs:
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    for d in dirs:
        tot = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        print(f"{os.path.relpath(d, args.repo)}: {tot:,} B ({tot / MIB:.2f} MiB) + tree {tree / MIB:.2f} MiB = "
              f"{(tot + tree) / MIB:.2f} MiB")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
