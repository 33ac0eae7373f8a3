#!/usr/bin/env bash
# Completion quality of the attention policies against full attention, on a
# development set built from real code nobody here wrote and every machine of
# this kind has: Python's standard library, the Rust crates in the cargo
# registry, and npm's own JavaScript.
#
#   tests/bench/eval-devset.sh [FILES [PER_FILE [SEED]]]
#
# The task set is rebuilt reproducibly (same sources, same seed: same tasks)
# under target/eval/ (git-ignored). Environment: ANCHORCODER (binary, default
# target/release/anchorcoder), MODEL (--model path, default: the default
# model), LIMIT (run only the first N tasks), MAX_PREFIX_BYTES (document cap
# before the cursor, default 6000 ≈ the 2048-token prompt budget), CONFIGS
# (which of the named configurations below to run, default all).
set -euo pipefail
cd "$(dirname "$0")/../.."

FILES=${1:-40}
PER_FILE=${2:-2}
SEED=${3:-1}
BIN=${ANCHORCODER:-target/release/anchorcoder}
OUT=target/eval
mkdir -p "$OUT"

if [[ ! -x $BIN ]]; then
  cargo build --release -p anchorcoder
fi

source tests/bench/devset-sources.sh  # (the cwd is the repository root here)
echo "sources: ${sources[*]}" >&2

TASKS=$OUT/dev-f$FILES-k$PER_FILE-s$SEED-p${MAX_PREFIX_BYTES:-6000}.jsonl
"$BIN" eval build-tasks --from "${sources[@]}" --files "$FILES" --per-file "$PER_FILE" --seed "$SEED" \
  --max-prefix-bytes "${MAX_PREFIX_BYTES:-6000}" --out "$TASKS"

model=()
[[ -n ${MODEL:-} ]] && model=(--model "$MODEL")
limit=()
[[ -n ${LIMIT:-} ]] && limit=(--limit "$LIMIT")

# The first configuration also runs every task under full attention
# (--compare-full); full attention is deterministic, so the others are
# compared with that same full run rather than repeating it.
declare -A CONF=(
  [window-560]="--policy window --window-tokens 560"
  [anchor-R8]="--policy anchor --recent-lines 8"
  [anchor-R0]="--policy anchor --recent-lines 0"
  [anchor-R32]="--policy anchor --recent-lines 32"
  [window-160]="--policy window --window-tokens 160"
)
# window-560 is the server's default policy.
ORDER=${CONFIGS:-window-560 anchor-R8 anchor-R0 anchor-R32 window-160}

summary=$OUT/summary-s$SEED.txt
: >"$summary"
compare=(--compare-full)
for name in $ORDER; do
  echo "== $name: ${CONF[$name]} ${compare[*]}" >&2
  # shellcheck disable=SC2086
  line=$("$BIN" eval --tasks "$TASKS" "${model[@]}" "${limit[@]}" ${CONF[$name]} "${compare[@]}" \
    --out "$OUT/results-$name-s$SEED.jsonl" | tail -n 1)
  echo "$name $line" >>"$summary"
  compare=()
done

echo
python3 - "$summary" <<'PY'
import json, sys
rows = [l.split(' ', 1) for l in open(sys.argv[1]) if l.strip()]
rows = [(n, json.loads(j)) for n, j in rows]
full = rows[0][1]["full"]
print(f'{"config":<12} {"tasks":>5} {"EM":>7} {"ES":>7} {"KV MB":>8} {"ms/task":>8} {"ES ratio":>9} {"KV ratio":>9}')
print(f'{"full":<12} {full["tasks"]:5d} {full["exact_match"]:7.3f} {full["edit_similarity"]:7.3f} '
      f'{full["kv_bytes"] / 1e6:8.2f} {full["latency_ms"]:8.0f} {1:9.3f} {1:9.3f}')
for n, s in rows:
    print(f'{n:<12} {s["tasks"]:5d} {s["exact_match"]:7.3f} {s["edit_similarity"]:7.3f} '
          f'{s["kv_bytes"] / 1e6:8.2f} {s["latency_ms"]:8.0f} '
          f'{s["edit_similarity"] / full["edit_similarity"]:9.3f} {s["kv_bytes"] / full["kv_bytes"]:9.3f}')
PY
