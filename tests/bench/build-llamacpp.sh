#!/usr/bin/env bash
# Build llama.cpp (the copy vendored in the llama-cpp-python 0.3.36 sdist, commit 0c1e570)
# for benchmarks and for tokenizer fixtures. Works offline except for the package registry.
#
#   tests/bench/build-llamacpp.sh            # builds once, prints the bin dir last
#   ANCHORCODER_TOOLS=/some/dir tests/bench/build-llamacpp.sh
#   LLAMACPP_FORCE=1 tests/bench/build-llamacpp.sh   # rebuild even if already built
#   LLAMACPP_TARGETS=llama-server tests/bench/build-llamacpp.sh   # only these targets (faster)
#
# Steps: a venv with scikit-build-core + cmake (pip wheels; cmake is not on these machines),
# `pip download` the sdist (pip prepares its metadata, which needs both), unpack it, and run
# cmake directly on vendor/llama.cpp with -DLLAMA_CURL=OFF.
#
# Instruction sets: on x86-64 the build does NOT use -DGGML_NATIVE=ON (-march=native). On a CPU
# that advertises AMX, -march=native turns on -mamx-*, ggml then compiles its AMX kernels, and on
# the virtual machines of this project those die with a segmentation fault right after "llama
# threadpool init" (the tile state is advertised but not usable). Instead every SIMD extension
# this CPU has (read from /proc/cpuinfo) is named explicitly and AMX is always off: the same
# kernels -march=native selects, minus AMX. The set is part of the build's key, so a tools folder
# carried to a machine with other flags is rebuilt rather than run (an illegal instruction).
# Other architectures keep GGML_NATIVE=ON. `tests/bench/build-llamacpp.sh --print-isa` prints the
# key and the cmake flags without building.
set -euo pipefail

VERSION=0.3.36
TOOLS="${ANCHORCODER_TOOLS:-$HOME/.cache/anchorcoder/tools}"
PREFIX="$TOOLS/llama.cpp"
BIN="$PREFIX/bin"
WORK="$PREFIX/work"
VENV="$PREFIX/venv"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
TARGETS=(llama-bench llama-tokenize llama-server llama-completion llama-cli)
# A subset (e.g. just llama-server for the remote-engine tests) builds faster;
# each target built that way leaves its own marker.
PARTIAL="${LLAMACPP_TARGETS:-}"
if [[ -n "$PARTIAL" ]]; then read -r -a TARGETS <<<"$PARTIAL"; fi

log() { printf '[build-llamacpp] %s\n' "$*" >&2; }

# GGML_* option for each /proc/cpuinfo flag that ggml has a kernel path for (x86-64).
ISA_MAP=(sse4_2:GGML_SSE42 avx:GGML_AVX avx2:GGML_AVX2 fma:GGML_FMA f16c:GGML_F16C bmi2:GGML_BMI2
    avx_vnni:GGML_AVX_VNNI avx512f:GGML_AVX512 avx512vbmi:GGML_AVX512_VBMI
    avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16)
# Sets ISA_KEY (names the build) and ISA_FLAGS (cmake arguments) for this machine.
isa_config() {
    local arch flags pair
    arch="$(uname -m)"
    ISA_FLAGS=()
    if [[ "$arch" != x86_64 ]]; then
        ISA_KEY="$arch-native"
        ISA_FLAGS=(-DGGML_NATIVE=ON)
        return
    fi
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    ISA_KEY="x86_64"
    ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    for pair in "${ISA_MAP[@]}"; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then
            ISA_KEY+="-${pair%%:*}"
            ISA_FLAGS+=("-D${pair#*:}=ON")
        else
            ISA_FLAGS+=("-D${pair#*:}=OFF")
        fi
    done
    # avx512f alone is not what GGML_AVX512 compiles for (it adds CD/VL/DQ/BW): require all five.
    if [[ "$flags" == *" avx512f "* ]]; then
        for f in avx512cd avx512vl avx512dq avx512bw; do
            if [[ "$flags" != *" $f "* ]]; then
                ISA_KEY="${ISA_KEY//-avx512f/}"
                ISA_FLAGS=("${ISA_FLAGS[@]/-DGGML_AVX512=ON/-DGGML_AVX512=OFF}")
                break
            fi
        done
    fi
}
isa_config
if [[ "${1:-}" == --print-isa ]]; then
    echo "key: $ISA_KEY"
    echo "cmake: ${ISA_FLAGS[*]}"
    exit 0
fi

MARK="$PREFIX/.built-$VERSION-$ISA_KEY"
# Binaries built for another instruction set (a tools folder carried to another machine) are
# removed, not run.
built_for="$(cat "$PREFIX/ISA" 2>/dev/null || echo "an unrecorded instruction set")"
if [[ "$built_for" != "$ISA_KEY" ]] && compgen -G "$BIN/llama-*" >/dev/null; then
    log "the tools in $BIN were built for $built_for, this CPU is $ISA_KEY: rebuilding"
    rm -f "$BIN"/llama-* "$PREFIX"/.built-*
fi
if [[ -z "${LLAMACPP_FORCE:-}" && -f "$MARK" && -x "$BIN/llama-tokenize" ]]; then
    log "already built (remove $PREFIX/.built-$VERSION or set LLAMACPP_FORCE=1 to rebuild)"
    echo "$BIN"
    exit 0
fi
if [[ -z "${LLAMACPP_FORCE:-}" && -n "$PARTIAL" ]]; then
    missing=0
    for t in "${TARGETS[@]}"; do
        [[ -f "$MARK-$t" && -x "$BIN/$t" ]] || missing=1
    done
    if [[ $missing == 0 ]]; then
        log "already built: ${TARGETS[*]}"
        echo "$BIN"
        exit 0
    fi
fi

PY="$(command -v python3 || true)"
if [[ -z "$PY" ]]; then
    log "python3 not found; install it (e.g. apt-get install python3 python3-venv)"
    exit 1
fi
for tool in cc c++ make; do
    if ! command -v "$tool" >/dev/null; then
        log "$tool not found; install a C/C++ toolchain (e.g. apt-get install build-essential)"
        exit 1
    fi
done

mkdir -p "$WORK" "$BIN"

if [[ ! -x "$VENV/bin/cmake" ]]; then
    log "creating venv with scikit-build-core and cmake in $VENV"
    timeout 300 "$PY" -m venv "$VENV"
    timeout 600 "$VENV/bin/python" -m pip install --quiet --upgrade pip
    timeout 600 "$VENV/bin/python" -m pip install --quiet scikit-build-core cmake
fi
export PATH="$VENV/bin:$PATH"

SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VERSION sdist"
    # Its progress goes to stderr: callers take the bin folder from stdout (`bin=$(...)`).
    timeout 900 "$VENV/bin/python" -m pip download --no-deps --no-binary llama-cpp-python \
        --no-build-isolation "llama-cpp-python==$VERSION" -d "$WORK" >&2
    # pip may name it with a dash
    if [[ ! -f "$SDIST" ]]; then
        found="$(ls "$WORK"/llama[-_]cpp[-_]python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)"
        [[ -n "$found" ]] || { log "sdist not found in $WORK after pip download"; exit 1; }
        mv "$found" "$SDIST"
    fi
fi

SRC_ROOT="$WORK/src"
if [[ ! -d "$SRC_ROOT/vendor/llama.cpp" ]]; then
    log "unpacking sdist"
    rm -rf "$SRC_ROOT" "$WORK/unpack"
    mkdir -p "$WORK/unpack"
    timeout 300 tar -xzf "$SDIST" -C "$WORK/unpack"
    mv "$WORK/unpack"/*/ "$SRC_ROOT"
    rm -rf "$WORK/unpack"
fi
LLAMA="$SRC_ROOT/vendor/llama.cpp"
[[ -f "$LLAMA/CMakeLists.txt" ]] || { log "no vendor/llama.cpp/CMakeLists.txt in the sdist"; exit 1; }

BUILD="$WORK/build-$ISA_KEY"
# Pass only the options this ggml version defines (an unknown -D is ignored by cmake, but say so).
cmake_isa=()
for opt in "${ISA_FLAGS[@]}"; do
    name="${opt#-D}"; name="${name%%=*}"
    if grep -qE "option\($name[[:space:]]" "$LLAMA/ggml/CMakeLists.txt" 2>/dev/null; then
        cmake_isa+=("$opt")
    else
        log "this ggml has no $name option: left out"
    fi
done
log "configuring for $ISA_KEY (cmake $(cmake --version | head -n1 | awk '{print $3}')): ${cmake_isa[*]}"
timeout 600 cmake -S "$LLAMA" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    "${cmake_isa[@]}" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >"$WORK/cmake-configure.log" 2>&1 \
    || { tail -n 40 "$WORK/cmake-configure.log" >&2; exit 1; }

# Keep only targets this llama.cpp version defines (llama-completion is newer than llama-cli split).
have=()
targets_list="$(timeout 120 cmake --build "$BUILD" --target help 2>/dev/null || true)"
for t in "${TARGETS[@]}"; do
    if grep -qE "(^|[ .:])$t(\$|[ :])" <<<"$targets_list"; then have+=("$t"); fi
done
for t in "${TARGETS[@]}"; do
    [[ " ${have[*]} " == *" $t "* || "$t" == llama-completion || "$t" == llama-cli ]] || { log "$t target missing"; exit 1; }
done
log "building ${have[*]} with $JOBS jobs (several minutes)"
timeout 3600 cmake --build "$BUILD" --config Release -j "$JOBS" --target "${have[@]}" \
    >"$WORK/cmake-build.log" 2>&1 || { tail -n 60 "$WORK/cmake-build.log" >&2; exit 1; }

for t in "${have[@]}"; do
    exe="$(find "$BUILD" -type f -name "$t" -perm -u+x | head -n1)"
    [[ -n "$exe" ]] || { log "built $t but cannot find the executable"; exit 1; }
    cp -f "$exe" "$BIN/$t"
done
(cd "$LLAMA" && git rev-parse --short HEAD 2>/dev/null || grep -m1 -o 'LLAMA_BUILD_COMMIT[^)]*' CMakeLists.txt 2>/dev/null || true) >"$PREFIX/SOURCE" || true
# The point of the explicit flags: no AMX code in what we run (see the top of this file).
"$(dirname "$0")/../../scripts/check-no-amx" "${have[@]/#/$BIN/}" >&2 \
    || { log "the build holds AMX instructions: it would crash on machines that advertise AMX"; exit 1; }
echo "$ISA_KEY" >"$PREFIX/ISA"
if [[ -n "$PARTIAL" ]]; then
    for t in "${have[@]}"; do touch "$MARK-$t"; done
else
    touch "$MARK"
fi
log "built: ${have[*]}"
echo "$BIN"
