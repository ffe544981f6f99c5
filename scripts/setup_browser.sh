#!/usr/bin/env bash
# Idempotent, cached set-up for the browser test of the web editor (tests/test_web.py):
#
#   chromium     Debian's package (/usr/bin/chromium), apt-get installed when missing; Playwright
#                drives it through executable_path and never downloads a browser of its own
#   playwright   the pinned Python package in .venv, when the lock has not already installed it
#
# A second run with everything in place takes well under a second and changes nothing.
# Prints the browser's path on its last line (the test reads LATENTEDIT_CHROMIUM or searches it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PLAYWRIGHT="playwright==1.65.2"
GREENLET="greenlet==3.5.6"

browser() {
  local path
  for path in "${LATENTEDIT_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    [ -n "$path" ] && [ -x "$path" ] && { echo "$path"; return 0; }
  done
  return 1
}

if ! BIN=$(browser); then
  echo "[browser] chromium missing: apt-get install -y chromium"
  [ "$(id -u)" = 0 ] || { echo "[browser] run as root (or install the Debian package chromium)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; }
  BIN=$(browser) || { echo "[browser] chromium installed but /usr/bin/chromium not found" >&2; exit 1; }
fi

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("playwright") != "1.65.2")' 2>/dev/null; then
  echo "[browser] installing $PLAYWRIGHT into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$PLAYWRIGHT" "$GREENLET" \
    2> >(grep -v "is ignored: it is neither" >&2)
fi

echo "$BIN"
