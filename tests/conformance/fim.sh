#!/usr/bin/env bash
# llama.cpp's `/infill` prompts for server/tests/conformance.rs's FIM test, no model download:
# prints the folder last (`ANCHORCODER_FIM_DIR=$(tests/conformance/fim.sh)`).
#
# infill-prompts.py writes small random-weight models with the vocabularies of the FIM families
# (Qwen2.5-Coder, CodeLlama, StarCoder2, DeepSeek-Coder; Llama 2's without FIM tokens), then, per
# model, starts llama-server and reads back the exact tokens of the prompt its `/infill` builds
# for every case of fim-cases.json (NAME.jsonl). The folder is keyed by these files and the
# llama.cpp build, next to run.sh's (whose cache it leaves alone).
#
#   ANCHORCODER_CONFORMANCE_ROOT=/some/dir tests/conformance/fim.sh   # where keyed folders live
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log() { printf '[fim] %s\n' "$*" >&2; }
GGUF_PY=gguf==0.19.0
NUMPY=numpy==2.4.6
MODELS=(qwen25-coder codellama starcoder2 deepseek-coder llama-spm)

if [[ -n "${XDG_CACHE_HOME:-}" && "$XDG_CACHE_HOME" == /* ]]; then cache="$XDG_CACHE_HOME"; else cache="$HOME/.cache"; fi
TOOLS="${ANCHORCODER_TOOLS:-$cache/anchorcoder/tools}"

bin="$(LLAMACPP_TARGETS=llama-server "$root/tests/bench/build-llamacpp.sh")"
key="$(cat "$here/fim.sh" "$here/infill-prompts.py" "$here/make-models.py" "$here/fim-cases.json" \
    "$TOOLS/llama.cpp/SOURCE" <(echo "$GGUF_PY $NUMPY") | sha256sum | cut -c1-16)"
out="${ANCHORCODER_CONFORMANCE_ROOT:-$cache/anchorcoder/conformance}/fim-$key"
if [[ -f "$out/.done" ]]; then
    log "already made: $out"
    echo "$out"
    exit 0
fi
rm -rf "$out"
mkdir -p "$out"
cp "$here/fim-cases.json" "$out/cases.json"

venv="$root/target/py-conformance"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$GGUF_PY" "$NUMPY"
vocab="$("$root/tests/bench/vocab-fixtures.sh")"
log "writing the models"
"$venv/bin/python" "$here/infill-prompts.py" models "$vocab" "$out" >/dev/null
for name in "${MODELS[@]}"; do
    "$venv/bin/python" "$here/infill-prompts.py" record "$bin/llama-server" "$out/$name.f32.gguf" \
        "$out/cases.json" "$out/$name.jsonl"
    log "$name: $(grep -c '"status": 200' "$out/$name.jsonl" || true) of $(wc -l <"$out/$name.jsonl") prompts built"
done
touch "$out/.done"
echo "$out"
