#!/usr/bin/env bash
# The GPU run, in device calls on the same warm machine, one per carry that
# pack_carry.py made (three today; see README.md), each within 30 s of the last:
#
#   call 1:  bash server/training/gpu_run.sh stash     carry: ["server/training/carry/a"]   timeout_s 120
#   call 2:  bash server/training/gpu_run.sh stash     carry: ["server/training/carry/b"]   timeout_s 120
#   call 3:  bash server/training/gpu_run.sh train     carry: ["server/training/carry/c"]   timeout_s 300
#
# `stash` copies the GGUF part it carries to $STASH (default /tmp/anchorcoder-stash)
# and checks its SHA-256; `train` joins all parts, checks the SHA-256 of the
# whole GGUF, then trains the issue-17 adapters, one after the
# other from the same base on the same prebuilt rows (fim.py: 2,048-token rows
# in the server's layout, half of them fill-in-the-middle, the FIM markers'
# embedding rows trained with the LoRA):
#   adapter_anchor_r2.safetensors   anchor(R=2, S=4, dense_every=0)
#   adapter_anchor_r0.safetensors   anchor(R=0, S=4, dense_every=0)
# evaluates base + both adapters on the held-out rows under both policies and
# full attention (loss, accuracy, FIM-middle loss/accuracy, KV fraction), and
# writes to $OUT: the two adapters, log.json, train.log (4 files; each adapter
# 14.1 MiB at rank 32, under the tool's 16 MiB per returned file).
#
# Timing rule (README.md): device time 15 min in all >= machine start (<= 3 min)
# + the stash calls (<= 40 s each) + the train call + one rerun of the train
# call. So the train call gets timeout_s 300 and this script stays well inside
# it: each variant trains for TRAIN_S (90 s, its step count calibrated on steps
# 5-15, hard stop at 1.1 x TRAIN_S), all training stops at MAX_TOTAL_S (230 s of
# program time), and the evaluations and exports after it take ~30 s: worst
# case ~260 s. Keep MAX_TOTAL_S >= 2.2 x TRAIN_S + 30 and MAX_TOTAL_S + 50 <=
# the call's timeout_s.
#
# Knobs (environment): VARIANTS (anchor:R=2:D=0,anchor:R=0:D=0), SINK_TOKENS (4),
# TRAIN_S (90), MAX_TOTAL_S (230), LR (1e-3), RANK (32), MLP_RANK (0: attention
# only; RANK=16 MLP_RANK=8 is 12.8 MiB), BATCH (8), EVAL_TOKENS (262144),
# EXTRA_EVAL (more eval policies, e.g. anchor:R=8:D=0), EXTRA_ARGS (appended to
# train.py's arguments: later flags win). `legacy` trains the issue-7 way
# (prepare_data.py's streams packed instead of rows: `pack_carry.py --data data`;
# anchor + full control on 1,024-token rows; RECENT_LINES, DENSE_EVERY, SEQ_LEN).
set -uo pipefail
cd "$(dirname "$0")"
MODE=${1:-train}
STASH=${STASH:-/tmp/anchorcoder-stash}
OUT=${OUT:-/tmp/anchorcoder-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

manifest_get() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

info() {
  echo "== $(date -u +%FT%TZ) $(hostname) mode=$MODE"
  (nvidia-smi -L || true) 2>&1 | head -3
  "$PY" -c 'import sys, torch, numpy, safetensors; print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1
  "$PY" -c 'import tokenizers; print("tokenizers", tokenizers.__version__)' 2>&1 || echo "tokenizers missing: no samples"
}

# A manifest of the carries (all alike; on the machine, the carried dir is there,
# and ignored dirs of earlier calls may be too).
a_manifest() { for d in carry/*/; do [ -f "$d/manifest.json" ] && { echo "$d/manifest.json"; return; }; done; }

# part NAME -> "bytes sha256" from a manifest
part_get() {
  "$PY" -c "import json,sys; p=[p for p in json.load(open(sys.argv[1]))['parts'] if p['name']==sys.argv[2]][0]; print(p['bytes'], p['sha256'])" "$1" "$2"
}

stash() {
  local m f n want got
  m=$(a_manifest)
  [ -n "$m" ] || { echo "FAIL: no carry/*/manifest.json: carry one of server/training/carry/<x>"; exit 2; }
  mkdir -p "$STASH"
  for f in carry/*/gguf.part*; do
    [ -f "$f" ] || continue
    n=$(basename "$f")
    read -r _ want < <(part_get "$m" "$n")
    cp "$f" "$STASH/$n"
    got=$(sha256sum "$STASH/$n" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "FAIL: $n sha256 $got != $want"; exit 3; }
    echo "STASHED $n ($(stat -c %s "$STASH/$n") bytes, sha256 ok) in $STASH"
  done
  echo "stash now holds: $(ls "$STASH" | tr '\n' ' ')"
}

assemble() {
  local m parts n p c
  m=$(a_manifest)
  [ -n "$m" ] || { echo "FAIL: no carry/*/manifest.json: carry server/training/carry/<last>"; exit 2; }
  DATA=carry/$(manifest_get "$m" data_carry)
  parts=$("$PY" -c "import json,sys; print(' '.join(p['name'] for p in json.load(open(sys.argv[1]))['parts']))" "$m")
  mkdir -p /tmp/anchorcoder-gguf
  GGUF=/tmp/anchorcoder-gguf/$(manifest_get "$m" gguf_name)
  : > "$GGUF"
  for n in $parts; do
    p=""
    for c in carry/*/"$n" "$STASH/$n"; do [ -f "$c" ] && { p=$c; break; }; done
    [ -n "$p" ] || { echo "FAIL: no $n on this machine: its stash call did not run on this machine (given back in between?); stashed: $(ls "$STASH" 2>/dev/null | tr '\n' ' ')"; exit 4; }
    cat "$p" >> "$GGUF"
  done
  local want got
  want=$(manifest_get "$m" gguf_sha256)
  got=$(sha256sum "$GGUF" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "FAIL: GGUF sha256 $got != $want"; exit 5; }
  echo "GGUF assembled from $parts: $GGUF $(stat -c %s "$GGUF") bytes, sha256 ok; data in $DATA"
}

train() {
  [ -f "$DATA/rows_meta.json" ] || { echo "FAIL: $DATA has no rows_meta.json: pack fim.py's rows (README.md)"; exit 6; }
  PYTHONUNBUFFERED=1 "$PY" train.py --gguf "$GGUF" --data "$DATA" --out "$OUT" \
    --policy "${VARIANTS:-anchor:R=2:D=0,anchor:R=0:D=0}" --steps-from each --sink-tokens "${SINK_TOKENS:-4}" \
    --extra-eval "${EXTRA_EVAL:-}" --time-budget "${TRAIN_S:-90}" --max-total-s "${MAX_TOTAL_S:-230}" \
    --steps 100000 --batch "${BATCH:-8}" --lr "${LR:-1e-3}" --warmup 40 --rank "${RANK:-32}" \
    --mlp-rank "${MLP_RANK:-0}" --eval-tokens "${EVAL_TOKENS:-262144}" --eval-batch 8 --samples 24 \
    --log-every 25 ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/train.log"
  local rc=${PIPESTATUS[0]}
  ls -la "$OUT"
  return "$rc"
}

legacy() {
  PYTHONUNBUFFERED=1 "$PY" train.py --gguf "$GGUF" --data "$DATA" --out "$OUT" \
    --policy anchor,full --recent-lines "${RECENT_LINES:-0}" --dense-every "${DENSE_EVERY:-4}" \
    --sink-tokens "${SINK_TOKENS:-4}" --extra-eval "${EXTRA_EVAL:-anchor:R=0:D=0,anchor:R=0:D=4}" \
    --time-budget "${TRAIN_S:-190}" --max-total-s "${MAX_TOTAL_S:-450}" --steps 100000 \
    --seq-len "${SEQ_LEN:-1024}" --batch "${BATCH:-16}" --lr "${LR:-1e-3}" --warmup 40 --rank "${RANK:-16}" \
    --eval-tokens 262144 --eval-batch 16 --samples 24 --log-every 25 ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/train.log"
  local rc=${PIPESTATUS[0]}
  ls -la "$OUT"
  return "$rc"
}

case "$MODE" in
  stash)  info; stash ;;
  train)  info; assemble && train ;;
  legacy) info; assemble && legacy ;;
  all)    info; stash && assemble && train ;;  # one call: only where everything fits one carry
  *) echo "usage: $0 stash|train|legacy|all"; exit 1 ;;
esac
