#!/usr/bin/env bash
# Speed and memory with a model of real size (issue 16): a random-weight GGUF of
# Qwen2.5-Coder-1.5B's exact shape in Q4_K_M, measured by `anchorcoder bench --model` side by side
# with llama.cpp (llama-bench, llama-server's resident memory) in the same run. No download but
# the pip packages: the weights are written here (tests/bench/make-qwen-1.5b.py, ~3 GB of F16,
# then llama-quantize), kept under the cache folder and never committed.
#
#   tests/bench/bench-qwen-1.5b.sh                    # 2 threads, --reps 3, prefill 512, decode 64 @ 512
#   RT=1 tests/bench/bench-qwen-1.5b.sh --reps 5      # under chrt -r 1 (see run-bench.sh); args go to bench
#   OUT=/tmp/bench tests/bench/bench-qwen-1.5b.sh     # also keep the table and JSON there
#
# The bench runs the speed tests only (no 2,048-token prompt, no first-suggestion or KV-replay
# check: on two cores each would take minutes with a model this size); pass other flags to add them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log() { printf '[bench-qwen-1.5b] %s\n' "$*" >&2; }
if [[ -n "${XDG_CACHE_HOME:-}" && "$XDG_CACHE_HOME" == /* ]]; then cache="$XDG_CACHE_HOME"; else cache="$HOME/.cache"; fi

GGUF_PY=gguf==0.19.0
NUMPY=numpy==2.4.6
bin="$(LLAMACPP_TARGETS="llama-quantize llama-bench llama-server" "$here/build-llamacpp.sh")"
key="$(cat "$here/make-qwen-1.5b.py" "$root/tests/conformance/make-models.py" "$root/tests/conformance/infill-prompts.py" \
    "$bin/../SOURCE" \
    <(echo "$GGUF_PY $NUMPY") | sha256sum | cut -c1-16)"
dir="$cache/anchorcoder/bench-models/qwen2.5-coder-1.5b-shape-$key"
model="$dir/qwen2.5-coder-1.5b-shape.Q4_K_M.gguf"
if [[ ! -f "$model" ]]; then
    mkdir -p "$dir"
    venv="$root/target/py-conformance"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$GGUF_PY" "$NUMPY"
    vocab="$("$here/vocab-fixtures.sh")"
    log "writing the F16 model (about 3 GB)"
    "$venv/bin/python" "$here/make-qwen-1.5b.py" "$vocab" "$dir/f16.gguf" >/dev/null
    log "quantizing to Q4_K_M"
    "$bin/llama-quantize" "$dir/f16.gguf" "$model.tmp" Q4_K_M 2 >"$dir/quantize.log" 2>&1 \
        || { tail -n 20 "$dir/quantize.log" >&2; exit 1; }
    mv "$model.tmp" "$model"
    rm -f "$dir/f16.gguf"
fi
log "model: $model ($(du -h "$model" | cut -f1))"
exec "$here/run-bench.sh" --model "$model" --threads 2 --reps 3 --prompt-tokens 512 --decode-tokens 64 \
    --long-prompt-tokens 0 --first-files 0 --check-tokens 0 --no-anchor-speed --llama-cpp "$bin" "$@"
