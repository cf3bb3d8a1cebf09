# Sourced by tools/test and tools/demo: make .venv and install skr8tr into it.
# Idempotent: the install runs again only when pyproject.toml changed (or the
# venv is new), so repeated runs cost nothing. Usage: ensure_venv [EXTRAS]
ensure_venv() {
  local extras="${1:-}"
  local py=""
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py="$candidate"
      break
    fi
  done
  if [ -z "$py" ]; then
    echo "error: skr8tr needs Python >= 3.11 (python3 is $(python3 --version 2>&1))" >&2
    return 2
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$py" --version)"
    "$py" -m venv .venv
  fi
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  local stamp=".venv/.skr8tr-installed-${extras:-base}"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] ||
     ! .venv/bin/python -c 'import skr8tr' 2>/dev/null; then
    echo "==> installing skr8tr $spec into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$spec"
    echo "$want" > "$stamp"
  fi
  # Byte-compile the package (only what changed since the last time). The
  # install is editable, so nothing else does, and with PYTHONDONTWRITEBYTECODE
  # set every `skr8tr` run would recompile its modules: ~30 ms of `skr8tr ping`.
  .venv/bin/python -m compileall -q skr8tr >/dev/null
}
