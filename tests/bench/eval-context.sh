#!/usr/bin/env bash
# Project context (issue 18): completion quality with context from other files
# off, as llama.vim's ring buffer of recent 64-line chunks, and as the server
# chooses it (`ours`), on cross-file tasks (a cursor at a name the file uses
# but only a file it imports defines) and on ordinary in-file tasks, from 16
# real projects nobody here wrote: Python packages installed on this machine
# (click, flask, jinja2, docker, jmespath, itsdangerous, werkzeug), crates in
# the cargo registry (ropey, tower-lsp, serde_json, h2, hyper, clap_builder,
# tokio) and the VS Code client's npm dependencies (vscode-languageclient,
# vscode-jsonrpc; `npm ci` in editors/vscode first). Projects that are
# missing are skipped (the script says which). Tasks are drawn at random
# (Python's random, seeded) from everything the projects give.
#
#   tests/bench/eval-context.sh [CROSS_TASKS [INFILE_TASKS]]    (defaults 100, 50)
#
# Environment: ANCHORCODER (binary, default target/release/anchorcoder), MODEL
# (default: the default model), OUT (default target/eval/context), CONTEXTS
# (default "off ring ours"), TOKENS (`--context-tokens`, default 512),
# ONLY_CHOICE=1 (only `--context-only`: what each task's context holds, no
# generation — seconds, for tuning the choice), DRAW_SEED (the random draw of
# both sets; default 7 for cross-file, 11 for in-file: another seed gives
# another sample of the same task pool, to check a change is not tuned to one
# draw). Each run resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."

CROSS=${1:-100}
INFILE=${2:-50}
BIN=${ANCHORCODER:-target/release/anchorcoder}
OUT=${OUT:-target/eval/context}
CONTEXTS=${CONTEXTS:-off ring ours}
TOKENS=${TOKENS:-512}
mkdir -p "$OUT"
[[ -x $BIN ]] || cargo build --release -p anchorcoder
MODEL=${MODEL:-$("$BIN" model pull)}

site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ 2>/dev/null | head -1)
node=editors/vscode/node_modules
projects=()
for p in click flask jinja2 docker jmespath itsdangerous werkzeug; do
  projects+=("$site/$p")
done
for c in ropey-1.6.1 tower-lsp-0.20.0 serde_json-1.0.154 h2-0.4.20 hyper-1.12.0 clap_builder-4.6.7 tokio-1.54.1; do
  projects+=("${registry%/}/$c")
done
projects+=("$node/vscode-languageclient/lib" "$node/vscode-jsonrpc/lib")
from=()
for p in "${projects[@]}"; do
  if [[ -d $p ]]; then from+=("$p"); else echo "eval-context: skipping missing project $p" >&2; fi
done

# Draw `n` lines of a task file at random (seeded), in their original order.
sample() { # FILE N SEED OUT
  python3 - "$@" <<'PY'
import random, sys
src, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = open(src).read().splitlines()
random.seed(seed)
pick = sorted(random.sample(range(len(lines)), min(n, len(lines))))
open(out, "w").write("".join(lines[i] + "\n" for i in pick))
PY
}

if [[ ! -s $OUT/cross-all.jsonl ]]; then
  "$BIN" eval build-tasks --cross-file --per-file 1 --max-prefix-bytes 3000 --seed 7 \
    --from "${from[@]}" --out "$OUT/cross-all.jsonl"
fi
if [[ ! -s $OUT/infile-all.jsonl ]]; then
  "$BIN" eval build-tasks --files 200 --min-prefix-bytes 1500 --max-prefix-bytes 3000 --per-file 1 --seed 11 \
    --from "${from[@]}" --out "$OUT/infile-all.jsonl"
fi
sample "$OUT/cross-all.jsonl" "$CROSS" "${DRAW_SEED:-7}" "$OUT/cross.jsonl"
sample "$OUT/infile-all.jsonl" "$INFILE" "${DRAW_SEED:-11}" "$OUT/infile.jsonl"
echo "eval-context: $(wc -l <"$OUT/cross.jsonl") cross-file tasks (of $(wc -l <"$OUT/cross-all.jsonl")), $(wc -l <"$OUT/infile.jsonl") in-file (of $(wc -l <"$OUT/infile-all.jsonl"))" >&2

for set in cross infile; do
  [[ $set == cross && $CROSS == 0 || $set == infile && $INFILE == 0 ]] && continue
  for ctx in $CONTEXTS; do
    if [[ -n ${ONLY_CHOICE:-} ]]; then
      [[ $ctx == off ]] && continue
      "$BIN" eval --model "$MODEL" --tasks "$OUT/$set.jsonl" --context "$ctx" --context-tokens "$TOKENS" \
        --context-only --out "$OUT/$set-$ctx-choice.jsonl"
    else
      echo "eval-context: $set, context $ctx" >&2
      "$BIN" eval --model "$MODEL" --tasks "$OUT/$set.jsonl" --context "$ctx" --context-tokens "$TOKENS" \
        --resume --out "$OUT/$set-$ctx.jsonl"
      echo "eval-context: $set, context $ctx: $OUT/$set-$ctx.jsonl" >&2
    fi
  done
done

# The table: per set and context, the means over the tasks every context answered.
[[ -n ${ONLY_CHOICE:-} ]] && exit 0
python3 - "$OUT" $CONTEXTS <<'PY'
import json, os, sys
out, contexts = sys.argv[1], sys.argv[2:]
for s in ("cross", "infile"):
    runs = {}
    for c in contexts:
        p = f"{out}/{s}-{c}.jsonl"
        if os.path.exists(p):
            rows = [json.loads(l) for l in open(p) if l.startswith('{"')]
            runs[c] = {r["id"]: r for r in rows if "edit_similarity" in r}
    if not runs:
        continue
    ids = set.intersection(*(set(r) for r in runs.values()))
    print(f"{s}: {len(ids)} tasks answered under every context")
    print("| context | exact | edit sim. | tasks with context | context defines the target | K/V per task |")
    print("|---|---|---|---|---|---|")
    for c, r in runs.items():
        rows = [r[i] for i in ids]
        n = len(rows) or 1
        mean = lambda k: sum(float(x.get(k) or 0) for x in rows) / n
        with_ctx = [x for x in rows if x.get("context_tokens")]
        defines = sum(bool(x.get("context_defines_target")) for x in with_ctx)
        print(f"| {c} | {mean('exact_match'):.2f} | {mean('edit_similarity'):.3f} | {len(with_ctx)} | "
              f"{defines} | {mean('kv_bytes') / 1e6:.1f} MB |")
    if "off" in runs:
        for c in runs:
            if c == "off":
                continue
            d = [(runs[c][i]["edit_similarity"], runs["off"][i]["edit_similarity"]) for i in ids]
            better = sum(a > b for a, b in d)
            worse = sum(a < b for a, b in d)
            delta = sum(a - b for a, b in d) / (len(d) or 1)
            print(f"{c} - off: {delta:+.3f} edit similarity ({better} tasks better, {worse} worse)")
    print()
PY
