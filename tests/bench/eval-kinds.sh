#!/usr/bin/env bash
# Completion quality per cursor kind (issue 14): mid-line (a character inside
# a line, target the rest of it), fresh-line (after a line's indentation, the
# line's code removed, as after Enter) and block (a block's first line, the
# whole block removed). Each kind is built from the same real code as
# eval-devset.sh (Python's standard library, the cargo registry, npm), run
# under the server's default policy with --compare-full (full attention) and
# --fresh-line-compare (the constrain / continue / off rules on the same
# prompt cache), and, when llama.cpp's server is built, in a second pass with
# --llama-server --llama-only (the same prompt tokens through its
# /completion, greedy). Block tasks are built with --runnable; `eval exec`
# then runs the file's own doctests on every suggested block of the Python
# tasks they exercise (the execution check). The kind `runnable` is a set of
# such blocks only (`build-tasks --kind block --runnable-only`, Python's
# standard library). Each pass resumes where a stopped run left off.
#
#   tests/bench/eval-kinds.sh [FILES [PER_FILE [SEED]]]
#
# Environment: ANCHORCODER (binary, default target/release/anchorcoder),
# MODEL (default: the default model), KINDS (default "mid-line fresh-line
# block"; add "runnable" for the doctest set), PASSES (default "ours llama"),
# MAX_PREFIX_BYTES (document cap before the cursor, default 2000 — smaller
# than eval-devset.sh's 6000 so three kinds fit in a bounded run on two
# cores), LLAMA_SERVER_BIN (default
# ~/.cache/anchorcoder/tools/llama.cpp/bin/llama-server; NO_LLAMA=1 skips it),
# OUT (default target/eval/kinds), COMPARE_RULES=0 (skip --fresh-line-compare:
# a quarter less time), FULL=0 (skip --compare-full), MAX_TOKENS (eval's
# --max-tokens for both passes; default: eval's, 48 for lines, 64 for blocks).
set -euo pipefail
cd "$(dirname "$0")/../.."

FILES=${1:-33}
PER_FILE=${2:-2}
SEED=${3:-1}
BIN=${ANCHORCODER:-target/release/anchorcoder}
OUT=${OUT:-target/eval/kinds}
PREFIX=${MAX_PREFIX_BYTES:-2000}
mkdir -p "$OUT"

if [[ ! -x $BIN ]]; then
  cargo build --release -p anchorcoder
fi
source tests/bench/devset-sources.sh
echo "sources: ${sources[*]}" >&2

common=()
[[ -n ${MODEL:-} ]] && common=(--model "$MODEL")
[[ -n ${MAX_TOKENS:-} ]] && common+=(--max-tokens "$MAX_TOKENS")
MODEL_PATH=${MODEL:-$HOME/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf}

passes=${PASSES:-ours llama}
llama=()
LLAMA_BIN=${LLAMA_SERVER_BIN:-${ANCHORCODER_TOOLS:-$HOME/.cache/anchorcoder/tools}/llama.cpp/bin/llama-server}
server_pid=
if [[ $passes == *llama* && -z ${NO_LLAMA:-} && -x $LLAMA_BIN ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$LLAMA_BIN" -m "$MODEL_PATH" -c 4096 -np 1 -t 2 --host 127.0.0.1 --port "$port" \
    >"$OUT/llama-server.log" 2>&1 &
  server_pid=$!
  trap '[[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null' EXIT
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  llama=(--llama-server "http://127.0.0.1:$port")
  echo "llama.cpp: $LLAMA_BIN on port $port" >&2
else
  echo "llama.cpp's server not found ($LLAMA_BIN), NO_LLAMA set or not in PASSES: no comparison" >&2
fi

for kind in ${KINDS:-mid-line fresh-line block}; do
  TASKS=$OUT/$kind-f$FILES-k$PER_FILE-s$SEED-p$PREFIX.jsonl
  case $kind in
    block) build=(--kind block --runnable --from "${sources[@]}") ;;
    runnable) build=(--kind block --runnable-only --from "${sources[0]}") ;;  # the stdlib
    *) build=(--kind "$kind" --from "${sources[@]}") ;;
  esac
  if [[ ! -s $TASKS ]]; then
    "$BIN" eval build-tasks "${build[@]}" --files "$FILES" --per-file "$PER_FILE" \
      --seed "$SEED" --max-prefix-bytes "$PREFIX" --out "$TASKS"
  fi
  echo "== $kind" >&2
  if [[ $passes == *ours* ]]; then
    compare=()
    [[ ${FULL:-1} != 0 ]] && compare+=(--compare-full)
    [[ ${COMPARE_RULES:-1} != 0 ]] && compare+=(--fresh-line-compare)
    "$BIN" eval --tasks "$TASKS" "${common[@]}" "${compare[@]}" \
      --out "$OUT/results-$kind-s$SEED.jsonl" --resume | tail -n 1 >"$OUT/summary-$kind-s$SEED.json"
  fi
  if ((${#llama[@]})); then
    "$BIN" eval --tasks "$TASKS" "${common[@]}" "${llama[@]}" --llama-only \
      --out "$OUT/results-$kind-llama-s$SEED.jsonl" --resume | tail -n 1 >"$OUT/summary-$kind-llama-s$SEED.json"
  fi
  if [[ $kind == block || $kind == runnable ]]; then
    results=()
    for f in "$OUT/results-$kind-s$SEED.jsonl" "$OUT/results-$kind-llama-s$SEED.jsonl"; do
      [[ -s $f ]] && results+=("$f")
    done
    if ((${#results[@]})); then
      "$BIN" eval exec --tasks "$TASKS" --results "${results[@]}" --out "$OUT/exec-$kind-s$SEED.jsonl" \
        | tail -n 1 >"$OUT/exec-$kind-s$SEED.json"
    fi
  fi
done

python3 - "$OUT" "$SEED" ${KINDS:-mid-line fresh-line block} <<'PY'
import json, os, sys
out, seed, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(name):
    p = f'{out}/{name}'
    return json.load(open(p)) if os.path.exists(p) and os.path.getsize(p) else {}
print(f'{"kind":<11} {"run":<22} {"tasks":>5} {"EM":>6} {"ES":>6} {"lines":>6} {"empty":>6} {"empty 1st":>9}')
for k in kinds:
    s, l = load(f'summary-{k}-s{seed}.json'), load(f'summary-{k}-llama-s{seed}.json')
    rows = [(f'default ({s["fresh_line"]})', s)] if s else []
    rows += [('full', s.get('full'))]
    rows += [(f'default ({n})', v) for n, v in s.get('variants', {}).items()]
    rows += [('llama.cpp raw', l.get('llama_cpp')), ('llama.cpp + rules', l.get('llama_cpp_rules'))]
    for name, r in rows:
        if r:
            print(f'{k:<11} {name:<22} {r["tasks"]:5d} {r["exact_match"]:6.3f} {r["edit_similarity"]:6.3f} '
                  f'{r["lines_right"]:6.3f} {r["empty"]:6.3f} {r["empty_first_line"]:9.3f}')
for k in kinds:
    e = load(f'exec-{k}-s{seed}.json')
    if e:
        print(f'{k}: execution check: {e["with_doctests"]} of {e["tasks"]} tasks run by doctests, '
              f'{e["runnable"]} runnable (control passed)')
        for name, p in e.get('pass', {}).items():
            print(f'  {name:<18} {p["passed"]:3d}/{p["tasks"]:<3d} pass rate {p["pass_rate"]:.3f}')
PY
