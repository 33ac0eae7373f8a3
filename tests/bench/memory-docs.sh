#!/usr/bin/env bash
# The server's resident memory with 20 open 2,000-line documents, each one's
# cache warmed: anchor and window against full, the cache budget lifted so that every
# document stays cached (--default-budget adds full under the default 512 MiB
# budget, where the LRU evicts). Prints a table and the ratios last.
#
#   tests/bench/memory-docs.sh [--docs 20] [--lines 2000] [--default-budget]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -p anchorcoder -p anchorcoder-e2e --bin anchorcoder --bin memory-docs >&2
"$TARGET/release/anchorcoder" model pull >/dev/null
ANCHORCODER_BIN="$TARGET/release/anchorcoder" "$TARGET/release/memory-docs" "$@"
