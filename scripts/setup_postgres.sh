#!/usr/bin/env bash
# Idempotent, cached set-up for the PostgreSQL job store (trainer_svc/postgres_store.py) and its
# tests (tests/test_job_store.py), which start their own throwaway server on loopback:
#
#   PostgreSQL server binaries   initdb, pg_ctl, postgres from Debian's `postgresql` package
#                                (/usr/lib/postgresql/<major>/bin), apt-get installed when missing
#   a system user                latentedit-pg: PostgreSQL refuses to run as root, so the tests run
#                                initdb / pg_ctl as this user (setpriv) when they run as root
#   psycopg                      the pinned client (binary wheel) in .venv, when the lock has not
#                                already installed it
#
# A second run with everything in place takes well under a second and changes nothing.
# Prints the server's bin directory on its last line (tests read LATENTEDIT_PG_BIN or search it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PSYCOPG="psycopg==3.3.9"
PSYCOPG_BINARY="psycopg-binary==3.3.9"
PG_USER=${LATENTEDIT_PG_USER:-latentedit-pg}

pg_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && { echo "$dir"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

if ! BIN=$(pg_bin); then
  echo "[postgres] server binaries missing: apt-get install -y postgresql"
  [ "$(id -u)" = 0 ] || { echo "[postgres] run as root (or install the Debian package postgresql)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >/dev/null; }
  # The package starts a cluster of its own; the tests never use it.
  BIN=$(pg_bin) || { echo "[postgres] postgresql installed but initdb/pg_ctl not found" >&2; exit 1; }
fi

if [ "$(id -u)" = 0 ] && ! id "$PG_USER" >/dev/null 2>&1; then
  echo "[postgres] creating system user $PG_USER (postgres refuses to run as root)"
  useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
fi

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import psycopg, sys; sys.exit(psycopg.__version__ != "3.3.9")' 2>/dev/null; then
  echo "[postgres] installing $PSYCOPG into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$PSYCOPG" "$PSYCOPG_BINARY" \
    2> >(grep -v "is ignored: it is neither" >&2)
fi

echo "$BIN"
