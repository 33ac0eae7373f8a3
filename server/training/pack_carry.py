#!/usr/bin/env python3
"""Lay out what travels to the GPU machine, in two carries that each fit.

The device tool copies at most 64 MiB per call (the whole working tree: tracked
files, untracked-not-ignored files and the carried paths together). The base
model alone is 93.8 MiB (98,362,432 bytes) and does not compress (xz -6: 86.3 MiB),
and a lossy copy would train the adapter against a different base than the one
the engine loads. So the GGUF travels byte-exact, split in two:

  carry/a/   gguf.part0 + manifest.json                    -> call 1: `gpu_run.sh stash`
  carry/b/   gguf.part1 + train/val tokens + manifest.json -> call 2: `gpu_run.sh train`

Call 1 copies part0 to /tmp/anchorcoder-stash on the (warm) machine; call 2
concatenates the parts, checks the SHA-256 of the whole GGUF, and trains. Both
calls must land on the same warm machine (it is given back after 30 s idle).

The split point is chosen so that both calls have the same amount of headroom.
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
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "carry"))
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(HERE, "..", "..")))
    ap.add_argument("--margin-mib", type=float, default=2.0, help="headroom left in each call for the repo growing")
    args = ap.parse_args(argv)

    gsize = os.path.getsize(args.gguf)
    data_files = []
    for stem in ("train", "val"):
        for ext in (".npy.xz", ".npy"):
            p = os.path.join(args.data, stem + ext)
            if os.path.exists(p):
                data_files.append(p)
                break
        else:
            sys.exit(f"no {stem}.npy[.xz] in {args.data}: run prepare_data.py --xz first")
    meta = os.path.join(args.data, "meta.json")
    if os.path.exists(meta):
        data_files.append(meta)
    dsize = sum(os.path.getsize(p) for p in data_files)
    tree = tree_bytes(args.repo)
    code = 4096  # the two manifests

    print(f"GGUF {gsize:,} B ({gsize / MIB:.2f} MiB); data {dsize:,} B ({dsize / MIB:.2f} MiB); "
          f"working tree besides carries {tree:,} B ({tree / MIB:.2f} MiB); limit per call {LIMIT / MIB:.0f} MiB")
    single = gsize + dsize + tree + code
    print(f"one call would need {single / MIB:.2f} MiB: {'fits' if single <= LIMIT else 'does NOT fit'}")
    # balance: part0 (+tree) == part1 + data (+tree)
    part0 = (gsize + dsize) // 2
    part1 = gsize - part0
    call_a = tree + part0 + code
    call_b = tree + part1 + dsize + code
    margin = args.margin_mib * MIB
    print(f"call 1 (stash): {call_a / MIB:.2f} MiB; call 2 (train): {call_b / MIB:.2f} MiB")
    if max(call_a, call_b) + margin > LIMIT:
        sys.exit("does not fit in two calls either: lower --max-tokens in prepare_data.py")

    whole = sha256(args.gguf)
    manifest = {"gguf_name": os.path.basename(args.gguf), "gguf_bytes": gsize, "gguf_sha256": whole,
                "part0_bytes": part0, "part0_sha256": sha256(args.gguf, 0, part0),
                "part1_bytes": part1, "part1_sha256": sha256(args.gguf, part0, part1)}
    a_dir, b_dir = os.path.join(args.out, "a"), os.path.join(args.out, "b")
    for d in (a_dir, b_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    with open(args.gguf, "rb") as src:
        with open(os.path.join(a_dir, "gguf.part0"), "wb") as f:
            left = part0
            while left:
                b = src.read(min(left, 8 * MIB))
                f.write(b)
                left -= len(b)
        with open(os.path.join(b_dir, "gguf.part1"), "wb") as f:
            shutil.copyfileobj(src, f)
    for p in data_files:
        shutil.copy(p, b_dir)
    for d in (a_dir, b_dir):
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    for d in (a_dir, b_dir):
        tot = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
        print(f"{os.path.relpath(d, args.repo)}: {tot:,} B ({tot / MIB:.2f} MiB) + tree {tree / MIB:.2f} MiB = "
              f"{(tot + tree) / MIB:.2f} MiB")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
