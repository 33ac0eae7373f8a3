#!/usr/bin/env bash
# Quality against KV bytes: `full`, `anchor` over recent lines R, sinks S and
# dense-layer strides D, and `window` at the KV budget of each anchor point,
# on long documents (files of 500+ lines, cursors with a full prompt window
# before them), then a table, the plot, and the ratios last.
#
#   tests/bench/eval-grid.sh
#
# Resumable: every finished point is a line of $OUT/grid.jsonl and is not run
# again (the table and the plot use $OUT/grid-common.jsonl: every point over
# the same tasks, see MIN_COMMON below); a point stopped half-way goes on from its last finished task
# (`eval --resume`). Stop it with Ctrl-C (or SIGSTOP/SIGCONT to pause it while
# timing something else); run the same command to go on.
#
# Environment: ANCHORCODER (binary; default: a release build), MODEL (--model),
# FILES / PER_FILE / SEED (the task set: default 20 files x 2 tasks, seed 1),
# LIMIT (tasks per point, default all), POINTS (the points, in order; default
# below), OUT (default target/eval/grid-f$FILES-k$PER_FILE-s$SEED), SVG (where
# the plot goes, default $OUT/eval-grid.svg), MIN_COMMON (a point stopped
# half-way with at least this many tasks, default 10, joins the table and the
# plot, and every point is then summarized over the tasks all of them have).
#
# A point is `full`, `anchor:R:S:D`, `window:W:S`, or `window@anchor:R:S:D`:
# the window whose KV bytes match that anchor point's (W from its measured
# mean KV bytes and full's bytes per token; the anchor point must come first).
set -euo pipefail
cd "$(dirname "$0")/../.."

FILES=${FILES:-20}
PER_FILE=${PER_FILE:-2}
SEED=${SEED:-1}
OUT=${OUT:-target/eval/grid-f$FILES-k$PER_FILE-s$SEED}
SVG=${SVG:-$OUT/eval-grid.svg}
BIN=${ANCHORCODER:-target/release/anchorcoder}
# The most informative points first, so that a partial run still answers the
# questions: the default, anchor against window at equal KV, then R, S, D.
POINTS=${POINTS:-full anchor:8:4:0 window@anchor:8:4:0 anchor:32:4:0 window@anchor:32:4:0 \
anchor:2:4:0 window@anchor:2:4:0 anchor:16:4:0 window@anchor:16:4:0 anchor:8:16:0 anchor:8:4:8 \
anchor:4:4:0 anchor:0:4:0 anchor:8:0:0 anchor:8:4:4 window@anchor:4:4:0}
mkdir -p "$OUT"
GRID=$OUT/grid.jsonl
touch "$GRID"

if [[ -z ${ANCHORCODER:-} ]]; then
  cargo build --release -p anchorcoder >&2
fi
model=()
[[ -n ${MODEL:-} ]] && model=(--model "$MODEL")
limit=()
[[ -n ${LIMIT:-} ]] && limit=(--limit "$LIMIT")

# The development set's sources (as tests/bench/eval-devset.sh): Python's
# standard library, the cargo registry's crates, npm's own JavaScript.
source tests/bench/devset-sources.sh  # (the cwd is the repository root here)

# Long documents: files of 500 lines and more, and at least 6,144 bytes
# before the cursor's line: the server's 2,048-token prompt budget is 6,144
# bytes (3 bytes a token), so every prompt window is full, as it is anywhere
# past the first ~150-250 lines of a long file.
TASKS=$OUT/tasks.jsonl
if [[ ! -s $TASKS ]]; then
  "$BIN" eval build-tasks --from "${sources[@]}" --files "$FILES" --per-file "$PER_FILE" --seed "$SEED" \
    --min-file-lines 500 --min-prefix-bytes 6144 --max-prefix-bytes 8192 --out "$TASKS"
fi

done_point() { grep -q "\"name\":\"$1\"" "$GRID"; }

# Window tokens whose KV bytes match an anchor point's mean: its mean KV bytes
# over full's bytes per token (full keeps every token), less the sinks. A
# window point already started for that anchor point keeps its W (resuming;
# or W chosen by hand, e.g. from the anchor point's first tasks to run both
# at once).
window_for() {
  local started
  started=$(ls "$OUT"/tasks-window-W*-S4-at-"$1".jsonl 2>/dev/null | head -n 1)
  if [[ -n $started ]]; then
    started=${started##*/tasks-window-W}
    echo "${started%%-*}"
    return
  fi
  python3 - "$OUT/tasks-full.jsonl" "$OUT/tasks-$1.jsonl" <<'PY'
import json, statistics, sys
full = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
per_token = statistics.median(r["kv_bytes"] / r["prompt_tokens"] for r in full)
anchor = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
print(max(1, round(statistics.mean(r["kv_bytes"] for r in anchor) / per_token) - 4))
PY
}

for point in $POINTS; do
  case $point in
    full) name=full; flags=(--policy full) ;;
    anchor:*)
      IFS=: read -r _ r s d <<<"$point"
      name=anchor-R$r-S$s-D$d
      flags=(--policy anchor --recent-lines "$r" --sink-tokens "$s" --dense-every "$d") ;;
    window@anchor:*)
      IFS=: read -r _ r s d <<<"$point"
      base=anchor-R$r-S$s-D$d
      if ! done_point "$base" || ! done_point full; then
        echo "== $point: needs full and $base first; skipped" >&2
        continue
      fi
      w=$(window_for "$base")
      name=window-W$w-S4-at-$base
      flags=(--policy window --window-tokens "$w" --sink-tokens 4) ;;
    window:*)
      IFS=: read -r _ w s <<<"$point"
      name=window-W$w-S$s
      flags=(--policy window --window-tokens "$w" --sink-tokens "$s") ;;
    *) echo "unknown point $point (full, anchor:R:S:D, window:W:S, window@anchor:R:S:D)" >&2; exit 2 ;;
  esac
  if done_point "$name"; then
    echo "== $name: done" >&2
    continue
  fi
  echo "== $name: ${flags[*]} ($(date -u +%H:%M:%S))" >&2
  t0=$(date +%s)
  summary=$("$BIN" eval --tasks "$TASKS" "${model[@]}" "${limit[@]}" "${flags[@]}" \
    --resume --out "$OUT/tasks-$name.jsonl" | tail -n 1)
  python3 - "$name" "$summary" "$OUT/tasks-$name.jsonl" $(($(date +%s) - t0)) >>"$GRID" <<'PY'
import json, sys
name, summary, tasks, secs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(tasks) if l.strip()]
summary.update(name=name, prompt_tokens=sum(r["prompt_tokens"] for r in rows) / len(rows),
               suggestions={r["id"]: r["suggestion"] for r in rows}, wall_s=secs)
print(json.dumps(summary, separators=(",", ":")))
PY
done

# Every point over the same tasks: the finished points, and a point stopped
# half-way (time ran out) if it has at least MIN_COMMON tasks (default 10),
# all summarized over the tasks that every one of them has done.
COMMON=$OUT/grid-common.jsonl
python3 - "$OUT" "${MIN_COMMON:-10}" >"$COMMON" <<'PY'
import glob, json, os, sys
out, least = sys.argv[1], int(sys.argv[2])
points = {}
for f in sorted(glob.glob(os.path.join(out, "tasks-*.jsonl"))):
    name = os.path.basename(f)[len("tasks-"):-len(".jsonl")]
    rows = {}
    for l in open(f):
        try:
            r = json.loads(l)
        except ValueError:
            continue
        rows[r["id"]] = r
    if len(rows) >= least:
        points[name] = rows
common = set.intersection(*(set(r) for r in points.values())) if points else set()
for name, rows in points.items():
    rs = [rows[i] for i in sorted(common)]
    mean = lambda k: sum(float(r[k]) for r in rs) / len(rs)
    print(json.dumps({"name": name, "policy": rs[0]["policy"], "tasks": len(rs),
                      "exact_match": mean("exact_match"), "edit_similarity": mean("edit_similarity"),
                      "kv_bytes": mean("kv_bytes"), "prompt_tokens": mean("prompt_tokens"),
                      "suggestions": {r["id"]: r["suggestion"] for r in rs}}, separators=(",", ":")))
PY
n_common=$(head -n 1 "$COMMON" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get("tasks", 0))')
"$BIN" eval plot --in "$COMMON" --out "$SVG" \
  --title "Edit similarity against KV bytes ($n_common tasks, 500+-line files, 2,048-token windows)"
GRID=$COMMON
echo "All points over the same $n_common tasks:"

python3 - "$GRID" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
full = next((r for r in rows if r["name"] == "full"), None)
if full is None:
    sys.exit("no full point yet")
fs = full["suggestions"]
def same(r):
    ids = [i for i in r["suggestions"] if i in fs]
    return sum(r["suggestions"][i] == fs[i] for i in ids) / max(1, len(ids))
print(f'{"point":<34} {"tasks":>5} {"prompt":>6} {"EM":>6} {"ES":>6} {"KV MB":>7} {"=full":>6} {"ES ratio":>8} {"KV ratio":>8}')
for r in sorted(rows, key=lambda r: r["kv_bytes"]):
    print(f'{r["name"]:<34} {r["tasks"]:5d} {r["prompt_tokens"]:6.0f} {r["exact_match"]:6.3f} {r["edit_similarity"]:6.3f} '
          f'{r["kv_bytes"] / 1e6:7.2f} {same(r):6.2f} {r["edit_similarity"] / full["edit_similarity"]:8.3f} '
          f'{r["kv_bytes"] / full["kv_bytes"]:8.3f}')
print("(prompt: mean prompt tokens; =full: share of suggestions identical to full's)")
print()
byname = {r["name"]: r for r in rows}
print("anchor against the window of equal KV bytes (edit similarity):")
for r in rows:
    if "-at-" in r["name"]:
        a = byname[r["name"].split("-at-")[1]]
        print(f'  {a["name"]:<18} {a["edit_similarity"]:.3f} at {a["kv_bytes"] / 1e6:6.2f} MB   '
              f'{r["name"].split("-at-")[0]:<14} {r["edit_similarity"]:.3f} at {r["kv_bytes"] / 1e6:6.2f} MB   '
              f'anchor/window {a["edit_similarity"] / max(r["edit_similarity"], 1e-9):.3f}')
print()
print("target: >= 0.97 of full's edit similarity at <= 0.20 of its KV bytes")
cands = [r for r in rows if r["name"] != "full" and r["kv_bytes"] / full["kv_bytes"] <= 0.20]
for fam in ("anchor", "window"):
    c = [r for r in cands if r["name"].startswith(fam)]
    if c:
        b = max(c, key=lambda r: r["edit_similarity"])
        ratio = b["edit_similarity"] / full["edit_similarity"]
        print(f'  best {fam} within 20% KV: {b["name"]}: ES ratio {ratio:.3f}, KV ratio '
              f'{b["kv_bytes"] / full["kv_bytes"]:.3f} -> {"PASS" if ratio >= 0.97 else "FAIL"}')
print()
print("ratios (ES ratio, KV ratio against full):")
for r in sorted(rows, key=lambda r: r["kv_bytes"]):
    print(f'  {r["name"]:<34} {r["edit_similarity"] / full["edit_similarity"]:.3f} {r["kv_bytes"] / full["kv_bytes"]:.3f}')
PY
