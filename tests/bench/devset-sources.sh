# Sourced by eval-devset.sh and eval-grid.sh: sets `sources` to the development
# set's real code that every machine of this kind has: Python's standard
# library, the cargo registry's crates, npm's own JavaScript.
sources=()
py=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])' 2>/dev/null || true)
[[ -n $py && -d $py ]] && sources+=("$py")
for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/; do
  [[ -d $d ]] && sources+=("${d%/}") && break
done
npm_dir=$(npm root -g 2>/dev/null || true)/npm
[[ -d $npm_dir ]] && sources+=("$npm_dir")
if ((${#sources[@]} == 0)); then
  echo "no sources found (python3 stdlib, cargo registry, npm)" >&2
  exit 1
fi
