#!/usr/bin/env bash
# The GPU run, in two device calls on the same warm machine (see README.md):
#
#   call 1:  bash server/training/gpu_run.sh stash     carry: ["server/training/carry/a"]
#   call 2:  bash server/training/gpu_run.sh train     carry: ["server/training/carry/b"]
#
# `stash` copies the first part of the GGUF to $STASH (default /tmp/anchorcoder-stash)
# and checks its SHA-256; `train` joins it with the second part, checks the
# SHA-256 of the whole GGUF, then trains the anchor-mask LoRA and the dense
# (full-mask) control LoRA on the same data for the same number of steps,
# evaluates base + both adapters on the held-out files and writes to $OUT:
#   adapter_anchor.safetensors  adapter_full.safetensors  log.json  train.log
# `all` does both in one call (only if everything fits one carry; it does not
# for the default model: see README.md).
#
# Knobs (environment): DENSE_EVERY (4), RECENT_LINES (0), SINK_TOKENS (4),
# TRAIN_S (190: seconds of training for the anchor run; the control reuses its
# step count), MAX_TOTAL_S (450: hard stop for training, measured from the
# program's start; evaluation and export still run), LR (1e-3), RANK (16),
# SEQ_LEN (1024), BATCH (16), EXTRA_ARGS (appended to train.py's arguments:
# later flags win).
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

stash() {
  local m=carry/a/manifest.json
  [ -f carry/a/gguf.part0 ] || { echo "FAIL: carry/a/gguf.part0 missing (carry server/training/carry/a)"; exit 2; }
  mkdir -p "$STASH"
  cp carry/a/gguf.part0 carry/a/manifest.json "$STASH/"
  local want got
  want=$(manifest_get $m part0_sha256)
  got=$(sha256sum "$STASH/gguf.part0" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "FAIL: part0 sha256 $got != $want"; exit 3; }
  echo "STASHED part0 ($(stat -c %s "$STASH/gguf.part0") bytes, sha256 ok) in $STASH"
}

assemble() {
  local m=carry/b/manifest.json p0=""
  [ -f carry/b/gguf.part1 ] || { echo "FAIL: carry/b/gguf.part1 missing (carry server/training/carry/b)"; exit 2; }
  for c in "$STASH/gguf.part0" carry/a/gguf.part0; do [ -f "$c" ] && { p0=$c; break; }; done
  [ -n "$p0" ] || { echo "FAIL: no gguf.part0 on this machine: call 1 (stash) did not run on this machine (it was given back in between?)"; exit 4; }
  mkdir -p /tmp/anchorcoder-gguf
  GGUF=/tmp/anchorcoder-gguf/$(manifest_get $m gguf_name)
  cat "$p0" carry/b/gguf.part1 > "$GGUF"
  local want got
  want=$(manifest_get $m gguf_sha256)
  got=$(sha256sum "$GGUF" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "FAIL: GGUF sha256 $got != $want"; exit 5; }
  echo "GGUF assembled: $GGUF $(stat -c %s "$GGUF") bytes, sha256 ok"
}

train() {
  PYTHONUNBUFFERED=1 "$PY" train.py --gguf "$GGUF" --data carry/b --out "$OUT" \
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
  stash) info; stash ;;
  train) info; assemble && train ;;
  all)   info; stash && assemble && train ;;
  *) echo "usage: $0 stash|train|all"; exit 1 ;;
esac
