#!/usr/bin/env bash
# Conformance against llama.cpp, no model download: prepares everything server/tests/conformance.rs
# compares and prints the folder last (`ANCHORCODER_CONFORMANCE_DIR=$(tests/conformance/run.sh)`).
#
#   1. llama.cpp (tests/bench/build-llamacpp.sh, llama-quantize and libllama) and, against its
#      libllama, tests/conformance/llama-logprobs.cpp;
#   2. tests/conformance/make-models.py (the `gguf` package from PyPI, pinned, in a venv under
#      target/): small random-weight F32 GGUFs of each architecture with the tokenizer of that
#      family (the vocabulary GGUFs of tests/bench/vocab-fixtures.sh);
#   3. llama-quantize: each model into Q4_0, Q4_1, Q8_0, Q4_K_M, Q5_K_M and Q6_K;
#   4. llama-logprobs: for each model and format, llama.cpp's tokens, top next-token
#      log-probabilities at every position of a few real source files (this repository's, copied
#      into the folder), and 64 greedy tokens from each file's first 48 tokens;
#   5. the same log-probabilities from each quantized file's weights dequantized to F32 (the exact
#      result that both programs approximate), and from the unquantized F32 model.
#
# The folder is keyed by everything that makes it (these scripts, the llama.cpp build): a second
# run with nothing changed only prints it. Models and outputs are generated: never commit them.
#
#   ANCHORCODER_CONFORMANCE_ROOT=/some/dir tests/conformance/run.sh   # where keyed folders live
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log() { printf '[conformance] %s\n' "$*" >&2; }

FORMATS=(Q4_0 Q4_1 Q8_0 Q4_K_M Q5_K_M Q6_K)
# Real source files of several languages (copies of this repository's own, frozen in prompts/ so
# that editing the originals does not rebuild the cache), compared up to 256 tokens each.
FILES=(tests/conformance/prompts/policy.rs.txt tests/conformance/prompts/fim.py.txt
    tests/conformance/prompts/settings.ts.txt tests/conformance/prompts/init.lua.txt)
GGUF_PY=gguf==0.19.0
NUMPY=numpy==2.4.6

if [[ -n "${XDG_CACHE_HOME:-}" && "$XDG_CACHE_HOME" == /* ]]; then cache="$XDG_CACHE_HOME"; else cache="$HOME/.cache"; fi
TOOLS="${ANCHORCODER_TOOLS:-$cache/anchorcoder/tools}"

# 1. llama.cpp: llama-quantize (its build also makes libllama.a), then our reference program.
bin="$(LLAMACPP_TARGETS=llama-quantize "$root/tests/bench/build-llamacpp.sh")"
isa="$("$root/tests/bench/build-llamacpp.sh" --print-isa | sed -n 's/^key: //p')"
src="$TOOLS/llama.cpp/work/src/vendor/llama.cpp"
build="$TOOLS/llama.cpp/work/build-$isa"
for lib in src/libllama.a ggml/src/libggml.a ggml/src/libggml-cpu.a ggml/src/libggml-base.a; do
    [[ -f "$build/$lib" ]] || { log "missing $build/$lib (llama.cpp build incomplete)"; exit 1; }
done
key="$(cat "$here/run.sh" "$here/make-models.py" "$here/llama-logprobs.cpp" "$TOOLS/llama.cpp/SOURCE" \
    <(echo "$isa $GGUF_PY $NUMPY ${FORMATS[*]}") <(cd "$root" && cat "${FILES[@]}") | sha256sum | cut -c1-16)"
out="${ANCHORCODER_CONFORMANCE_ROOT:-$cache/anchorcoder/conformance}/$key"
if [[ -f "$out/.done" ]]; then
    log "already made: $out"
    echo "$out"
    exit 0
fi
rm -rf "$out"
mkdir -p "$out/files"
started=$SECONDS

ref="$out/llama-logprobs"
log "compiling llama-logprobs against $build"
c++ -O2 -std=c++17 -I"$src/include" -I"$src/ggml/include" "$here/llama-logprobs.cpp" \
    "$build/src/libllama.a" "$build/ggml/src/libggml.a" "$build/ggml/src/libggml-cpu.a" \
    "$build/ggml/src/libggml-base.a" -fopenmp -lpthread -ldl -o "$ref"

# 2. The models.
venv="$root/target/py-conformance"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$GGUF_PY" "$NUMPY"
vocab="$("$root/tests/bench/vocab-fixtures.sh")"
log "writing the F32 models"
"$venv/bin/python" "$here/make-models.py" "$vocab" "$out" >/dev/null

# llama-logprobs on a model: up to 256 tokens of each file, llama.cpp's 8 likeliest next tokens.
reference() {
    local model="$1" dest="$2"
    shift 2
    "$ref" "$model" --max-tokens 256 --top-k 8 --prompt-tokens 48 --threads 2 "$@" "${files[@]}" \
        >"$dest" 2>"$out/llama-logprobs.log" || { tail -n 20 "$out/llama-logprobs.log" >&2; exit 1; }
}
for f in "${FILES[@]}"; do cp "$root/$f" "$out/files/"; done
files=("$out"/files/*)
for f32 in "$out"/*.f32.gguf; do
    name="$(basename "$f32" .f32.gguf)"
    for fmt in "${FORMATS[@]}"; do
        q="$out/$name.$fmt.gguf"
        # 3. Quantized by llama.cpp.
        "$bin/llama-quantize" "$f32" "$q" "$fmt" 2 >"$out/quantize.log" 2>&1 \
            || { tail -n 20 "$out/quantize.log" >&2; exit 1; }
        # 4. llama.cpp's log-probabilities and greedy tokens.
        reference "$q" "$out/$name.$fmt.jsonl" --greedy 64
        # 5. The exact value for this file: its weights dequantized to F32, run by llama.cpp
        #    (f32 matrix products, no activation quantization). Both programs' errors against it
        #    are compared by the test.
        "$venv/bin/python" "$here/make-models.py" dequantize "$q" "$out/exact.gguf"
        reference "$out/exact.gguf" "$out/$name.$fmt.exact.jsonl"
        rm -f "$out/exact.gguf"
        log "$name $fmt: $(du -h "$q" | cut -f1)"
    done
    # The unquantized model is a format too: f32 products on both sides.
    mv "$f32" "$out/$name.F32.gguf"
    reference "$out/$name.F32.gguf" "$out/$name.F32.jsonl" --greedy 64
done
touch "$out/.done"
log "made in $((SECONDS - started)) s: $out"
echo "$out"
