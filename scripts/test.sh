#!/usr/bin/env bash
# Set up (idempotent, cached) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[checks] ruff (whole tree), mypy (the core library), buf breaking (against the released API)"
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary latentedit
.venv/bin/buf breaking --against protos/released/v1.binpb
# The set-up provides PostgreSQL, so its job-store tests must run here, never skip.
export LATENTEDIT_REQUIRE_POSTGRES=${LATENTEDIT_REQUIRE_POSTGRES:-1}
# Likewise Debian's chromium (scripts/setup_browser.sh): the web editor's browser tests must run.
export LATENTEDIT_REQUIRE_BROWSER=${LATENTEDIT_REQUIRE_BROWSER:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
