#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vocabularies (vocab-only GGUFs with reference inputs and
# token ids: models/ggml-vocab-*.gguf{,.inp,.out}) for server/tests/tokenizer_vocabs.rs.
# They are third-party files (llama.cpp, MIT): never commit them.
#
#   tests/bench/vocab-fixtures.sh          # prints the folder last
#   ANCHORCODER_VOCAB_DIR=/some/dir tests/bench/vocab-fixtures.sh
#
# Source: the llama-cpp-python 0.3.36 sdist from PyPI, which vendors llama.cpp (commit 0c1e570,
# the one tests/bench/build-llamacpp.sh builds). Its copy is reused when already downloaded or
# unpacked there; otherwise `pip download` fetches the sdist (about 74 MB) into a temporary folder.
# Only vendor/llama.cpp/models/ggml-vocab-* is kept.
set -euo pipefail

VERSION=0.3.36
TOOLS="${ANCHORCODER_TOOLS:-$HOME/.cache/anchorcoder/tools}"
if [[ -n "${XDG_CACHE_HOME:-}" && "$XDG_CACHE_HOME" == /* ]]; then
    CACHE="$XDG_CACHE_HOME"
else
    CACHE="$HOME/.cache"
fi
DEST="${ANCHORCODER_VOCAB_DIR:-$CACHE/anchorcoder/vocab}"
STAMP="$DEST/.from-llama-cpp-python-$VERSION"

log() { printf '[vocab-fixtures] %s\n' "$*" >&2; }

if [[ -f "$STAMP" ]] && ls "$DEST"/ggml-vocab-*.gguf.out >/dev/null 2>&1; then
    log "already in $DEST"
    echo "$DEST"
    exit 0
fi
mkdir -p "$DEST"

UNPACKED="$TOOLS/llama.cpp/work/src/vendor/llama.cpp/models"
SDIST="$TOOLS/llama.cpp/work/llama_cpp_python-$VERSION.tar.gz"
if ls "$UNPACKED"/ggml-vocab-*.gguf >/dev/null 2>&1; then
    log "copying from the llama.cpp build tree $UNPACKED"
    cp -f "$UNPACKED"/ggml-vocab-* "$DEST"/
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if [[ ! -f "$SDIST" ]]; then
        command -v python3 >/dev/null || { log "python3 not found; install it"; exit 1; }
        log "downloading the llama-cpp-python==$VERSION sdist with pip"
        timeout 1200 python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            "llama_cpp_python==$VERSION" -d "$tmp" \
            || { log "pip download failed (network, or pip missing: python3 -m ensurepip)"; exit 1; }
        SDIST="$(ls "$tmp"/llama[-_]cpp[-_]python-"$VERSION".tar.gz | head -n1)"
    fi
    log "extracting ggml-vocab-* from $SDIST"
    timeout 600 tar -xzf "$SDIST" -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
    cp -f "$tmp"/*/vendor/llama.cpp/models/ggml-vocab-* "$DEST"/
fi
n="$(ls "$DEST"/ggml-vocab-*.gguf | wc -l)"
[[ "$n" -gt 0 ]] || { log "no ggml-vocab-*.gguf found"; exit 1; }
touch "$STAMP"
log "$n vocabularies in $DEST"
echo "$DEST"
