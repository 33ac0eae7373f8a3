#!/usr/bin/env bash
# Build AnchorCoder in release mode and run `anchorcoder bench` (see docs/benchmarks.md).
#
#   tests/bench/run-bench.sh                      # default model, default file, 2 threads
#   tests/bench/run-bench.sh --reps 5 --wait-idle 600
#   OUT=/tmp/bench tests/bench/run-bench.sh       # also keep the table and JSON there
#   RT=1 tests/bench/run-bench.sh                 # run under `chrt -r 1` (see below)
#
# On a machine shared with other jobs (builds, tests), spin-waiting thread pools (candle's and
# llama.cpp's) lose most of their speed whenever another process takes a core, and the figures
# swing by 10x. RT=1 runs the benchmark (and llama.cpp, which inherits it) under the round-robin
# real-time class so that both engines get the two cores as on an idle machine; the kernel's RT
# throttling still leaves other processes 5%. The report states the scheduling class and how
# much CPU other processes took while each engine was measured.
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
RUN=("$BIN")
if [[ -n "${RT:-}" ]]; then
    command -v chrt >/dev/null || { echo "RT=1 needs chrt (util-linux)" >&2; exit 1; }
    RUN=(chrt -r 1 "$BIN")
fi

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    stamp="$(date -u +%Y%m%dT%H%M%SZ)"
    "${RUN[@]}" bench "$@" 2> >(tee "$OUT/bench-$stamp.log" >&2) | tee "$OUT/bench-$stamp.txt"
    tail -n 1 "$OUT/bench-$stamp.txt" >"$OUT/bench-$stamp.json"
    echo "saved $OUT/bench-$stamp.{txt,json,log}" >&2
else
    "${RUN[@]}" bench "$@"
fi
