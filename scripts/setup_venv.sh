#!/usr/bin/env bash
# Creates .venv/ with the project installed editable (plus test extras); a no-op when
# .venv is up to date with pyproject.toml. Used by `make quickstart` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=.venv/.installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && .venv/bin/python -c "import axolotl_dskd, axolotl" 2>/dev/null; then
  exit 0
fi
LOG=$(mktemp)
step() { echo "[setup] $1"; shift; "$@" >>"$LOG" 2>&1 || { echo "[setup] failed; last lines of $LOG:"; tail -n 30 "$LOG"; exit 1; }; }
[ -x .venv/bin/python ] || step "creating .venv" python3 -m venv .venv
step "upgrading pip" .venv/bin/python -m pip install --upgrade pip
# torch first: axolotl 0.19 pins torch<=2.13.0; on CPU-only machines with the wheel on disk this is instant
step "installing torch 2.13.0" .venv/bin/python -m pip install "torch==2.13.0"
step "installing axolotl-dskd (editable) with axolotl, bitsandbytes and test tools (~2 min)" \
  .venv/bin/python -m pip install -e ".[test,bench]"
touch "$STAMP"
echo "[setup] .venv ready"
