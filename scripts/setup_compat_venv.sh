#!/usr/bin/env bash
# Creates .venv-compat/ (Python 3.12) with axolotl 0.21.0 and the project installed editable (plus
# test extras), to check the plugin against the Axolotl users get today; .venv/ stays on axolotl
# 0.19 / Python 3.11. A no-op when the environment is up to date with pyproject.toml. Used by
# `make test-compat`; AXOLOTL_VERSION and VENV select another release and folder.
# The Python 3.12 comes from $PYTHON312 if set, else from `python3.12` on PATH, else from pyenv's
# installed 3.12 versions. PyPI's torch for it is the CUDA build (several GB; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
AXOLOTL_VERSION=${AXOLOTL_VERSION:-0.21.0}
VENV=${VENV:-.venv-compat}
STAMP=$VENV/.installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && "$VENV/bin/python" -c "
import importlib.metadata as m, axolotl_dskd, axolotl
assert m.version('axolotl') == '$AXOLOTL_VERSION'" 2>/dev/null; then
  exit 0
fi

# a pyenv shim named python3.12 can be on PATH and still fail to run, so check that it runs
is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY=${PYTHON312:-}
if [ -n "$PY" ]; then
  is_py312 "$PY" || { echo "[setup-compat] \$PYTHON312=$PY is not a working Python 3.12" >&2; exit 1; }
elif PY=$(command -v python3.12) && is_py312 "$PY"; then
  :
elif command -v pyenv >/dev/null && PY=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1) \
    && [ -n "$PY" ] && is_py312 "$PY"; then
  :
else
  echo "[setup-compat] no working python3.12 on PATH; axolotl $AXOLOTL_VERSION needs Python >=3.12." >&2
  echo "[setup-compat] set PYTHON312=/path/to/python3.12 (e.g. PYTHON312=\$(pyenv root)/versions/3.12.1/bin/python3.12)" >&2
  exit 1
fi

LOG=${SETUP_LOG:-$(mktemp)}
step() { echo "[setup-compat] $1"; shift; "$@" >>"$LOG" 2>&1 || { echo "[setup-compat] failed; last lines of $LOG:"; tail -n 30 "$LOG"; exit 1; }; }
# an env left by another Python (or half made) is rebuilt from scratch
if ! is_py312 "$VENV/bin/python"; then
  step "creating $VENV with $PY" "$PY" -m venv --clear "$VENV"
fi
step "upgrading pip" "$VENV/bin/python" -m pip install --upgrade pip
step "installing axolotl $AXOLOTL_VERSION with its torch (several GB on a cold cache), bitsandbytes and axolotl-dskd (editable) with test tools" \
  "$VENV/bin/python" -m pip install "axolotl==$AXOLOTL_VERSION" bitsandbytes -e ".[test]"
touch "$STAMP"
echo "[setup-compat] $VENV ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("axolotl", m.version("axolotl"), "torch", m.version("torch"))'))"
