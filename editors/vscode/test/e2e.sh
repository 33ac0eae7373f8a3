#!/usr/bin/env bash
# End-to-end test of the VS Code extension in real VS Code (code-server 4.139.1) driven by
# headless Chromium through playwright-core, against the real anchorcoder server and model.
#
# Installs what it needs (idempotent, cached under ${XDG_CACHE_HOME:-~/.cache}/anchorcoder/code-server),
# builds the platform package as a user gets it (scripts/package --vsix-only: the .vsix for this
# platform carrying the server binary), installs it into code-server with no `anchorcoder` on PATH
# and no `anchorcoder.server.path` setting, opens a Python file, types, and checks that the bundled
# server is the one running, that ghost text appears and that Tab inserts it.
# Env: ANCHORCODER_BIN (server binary; default: <repo>/target/debug/anchorcoder).
# Last line of output: "N passed, M failed".
set -uo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"      # editors/vscode
ROOT="$(cd "$HERE/../.." && pwd)"             # repository root
OUT_DIR="$HERE/test-output"
BIN="${ANCHORCODER_BIN:-$ROOT/target/debug/anchorcoder}"
TMP="$(mktemp -d /tmp/anchorcoder-vscode-e2e.XXXXXX)"
CS_PID=""

cleanup() {
  if [ -n "$CS_PID" ]; then
    kill -TERM -- "-$CS_PID" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$CS_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$CS_PID" 2>/dev/null
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail_early() {
  echo "e2e: $*" >&2
  echo "0 passed, 1 failed"
  exit 1
}
step() { echo "== $*"; }

[ -x "$BIN" ] || fail_early "server binary not found at $BIN (cargo build -p anchorcoder, or set ANCHORCODER_BIN)"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

step "setup: chromium, libkrb5-dev, Node 24, code-server 4.139.1 (cached)"
SETUP_OUT="$(timeout 3000 "$HERE/test/setup.sh")" || fail_early "setup failed"
eval "$SETUP_OUT"   # NODE24_DIR, CODE_SERVER

step "build the platform package (scripts/package --vsix-only, carrying $BIN)"
case "$(uname -m)" in
  x86_64) PLATFORM=linux-x64 ;;
  aarch64|arm64) PLATFORM=linux-arm64 ;;
  *) fail_early "no VS Code platform for $(uname -m)" ;;
esac
cd "$HERE" || fail_early "no $HERE"
if [ ! -d node_modules/vscode-languageclient ] || [ ! -x node_modules/.bin/vsce ] || [ package.json -nt node_modules/.package-lock.json ]; then
  timeout 900 npm install --no-audit --no-fund || fail_early "npm install failed"
fi
# `vsce package` compiles first (vscode:prepublish).
timeout 600 "$ROOT/scripts/package" --vsix-only --platform "$PLATFORM" --binary "$BIN" --out "$TMP/dist" \
  || fail_early "scripts/package --vsix-only failed"
VSIX="$(ls "$TMP"/dist/anchorcoder-*-"$PLATFORM".vsix)"

step "install the extension into code-server"
mkdir -p "$TMP/home" "$TMP/user/User" "$TMP/ext" "$TMP/ws" "$TMP/xdg-config" "$TMP/xdg-data" "$OUT_DIR"
export XDG_CONFIG_HOME="$TMP/xdg-config" XDG_DATA_HOME="$TMP/xdg-data"
PATH="$NODE24_DIR/bin:$PATH" timeout 180 "$CODE_SERVER" --user-data-dir "$TMP/user" --extensions-dir "$TMP/ext" \
  --install-extension "$VSIX" || fail_early "installing the .vsix failed"

cat > "$TMP/user/User/settings.json" <<EOF
{
  "chat.disableAIFeatures": true,
  "github.copilot.enable": { "*": false },
  "update.mode": "none",
  "workbench.startupEditor": "none",
  "workbench.tips.enabled": false,
  "workbench.enableExperiments": false,
  "telemetry.telemetryLevel": "off",
  "extensions.ignoreRecommendations": true,
  "extensions.autoCheckUpdates": false,
  "security.workspace.trust.enabled": false,
  "editor.quickSuggestions": { "other": false, "comments": false, "strings": false },
  "editor.suggestOnTriggerCharacters": false,
  "editor.wordBasedSuggestions": "off",
  "editor.inlineSuggest.enabled": true,
  "editor.minimap.enabled": false,
  "files.autoSave": "off"
}
EOF
# Accept one line of a suggestion (VS Code has the command, with no default key).
cat > "$TMP/user/User/keybindings.json" <<EOF
[{ "key": "ctrl+alt+l", "command": "editor.action.inlineSuggest.acceptNextLine", "when": "inlineSuggestionVisible" }]
EOF
cat > "$TMP/ws/fib.py" <<'EOF'
def add(a, b):
    return a + b


def fibonacci(n):
    """Return the n-th Fibonacci number."""
EOF

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
step "start code-server on 127.0.0.1:$PORT"
# Nothing on PATH may provide `anchorcoder`: the extension must use the binary it carries.
CLEAN_PATH="$NODE24_DIR/bin"
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do [ -e "$d/anchorcoder" ] || CLEAN_PATH="$CLEAN_PATH:$d"; done
# A fresh HOME hides ~/.cargo/bin; the model cache stays where `anchorcoder model pull` put it.
XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}" PATH="$CLEAN_PATH" HOME="$TMP/home" setsid "$CODE_SERVER" --bind-addr "127.0.0.1:$PORT" --auth none \
  --disable-telemetry --disable-update-check --disable-workspace-trust \
  --user-data-dir "$TMP/user" --extensions-dir "$TMP/ext" "$TMP/ws" > "$OUT_DIR/code-server.log" 2>&1 &
CS_PID=$!
ok=""
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then ok=1; break; fi
  kill -0 "$CS_PID" 2>/dev/null || break
  sleep 1
done
[ -n "$ok" ] || { tail -20 "$OUT_DIR/code-server.log" >&2; fail_early "code-server did not come up"; }

step "playwright: type in fib.py, wait for ghost text, accept with Tab"
rm -f "$OUT_DIR/results.json" "$OUT_DIR"/*.png
CS_URL="http://127.0.0.1:$PORT" WORKSPACE="$TMP/ws" TEST_FILE="fib.py" OUT_DIR="$OUT_DIR" \
  timeout 400 node "$HERE/test/e2e.mjs"
rc=$?
# Keep the extension host's log of the server for the record.
find "$TMP/user/logs" -name '*AnchorCoder*' -exec cp {} "$OUT_DIR/anchorcoder-output.log" \; 2>/dev/null

passed=0; failed=0
if [ -f "$OUT_DIR/results.json" ]; then
  passed=$(grep -c '"ok": true' "$OUT_DIR/results.json")
  failed=$(grep -c '"ok": false' "$OUT_DIR/results.json")
fi
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$rc" -eq 0 ]
