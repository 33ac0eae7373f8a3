#!/usr/bin/env bash
# Build AnchorCoder in release mode and run `anchorcoder bench` (see docs/benchmarks.md).
#
#   tests/bench/run-bench.sh                      # default model, default file, 2 threads
#   tests/bench/run-bench.sh --reps 5 --wait-idle 600
#   OUT=/tmp/bench tests/bench/run-bench.sh       # also keep the table and JSON there
#
# Extra arguments go to `anchorcoder bench`. llama.cpp is taken from
# $ANCHORCODER_TOOLS/llama.cpp/bin (default ~/.cache/anchorcoder/tools/llama.cpp/bin);
# build it first with tests/bench/build-llamacpp.sh, or pass --build-llama-cpp.
# The last line of the output is the JSON report.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
cargo build --release -p anchorcoder >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/anchorcoder"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    stamp="$(date -u +%Y%m%dT%H%M%SZ)"
    "$BIN" bench "$@" 2> >(tee "$OUT/bench-$stamp.log" >&2) | tee "$OUT/bench-$stamp.txt"
    tail -n 1 "$OUT/bench-$stamp.txt" >"$OUT/bench-$stamp.json"
    echo "saved $OUT/bench-$stamp.{txt,json,log}" >&2
else
    "$BIN" bench "$@"
fi
