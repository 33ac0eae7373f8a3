#!/usr/bin/env bash
# Keystroke-to-suggestion latency while switching between three real files:
# our server over LSP against llama.cpp's llama-server used the way llama.vim
# uses it (one slot, /completion with cache_prompt, the same prefix window),
# same GGUF, 2 threads each. Prints p50/p95 of both and the ratios last.
#
#   tests/bench/typing-files.sh [--rounds 2] [--policy window|anchor|full] [--pause-ms 30] [--no-visit-warm]
#                               [--only ours|llama] [--rest-every N] [--context-compare [--compare-pairs N]]
#
# Builds both release binaries and llama.cpp (tests/bench/build-llamacpp.sh)
# if missing; RT=1 runs everything under `chrt -r 1` as run-bench.sh does.
# Under RT=1 the servers' threads are SCHED_RR too: while the model threads
# work in a pause (our staged project context), the LSP thread that reads the
# next keystroke waits for their round-robin quantum (100 ms), which a plain
# run does not. Compare context on and off (`--context-compare`) without RT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -p anchorcoder -p anchorcoder-e2e --bin anchorcoder --bin typing-replay-files >&2
LLAMA_BIN="$("$ROOT/tests/bench/build-llamacpp.sh")"
MODEL="$("$TARGET/release/anchorcoder" model pull)"
RUN=()
[[ -n "${RT:-}" ]] && RUN=(chrt -r 1)
ANCHORCODER_BIN="$TARGET/release/anchorcoder" "${RUN[@]}" "$TARGET/release/typing-replay-files" \
  --llama-server "$LLAMA_BIN/llama-server" --model "$MODEL" "$@"
