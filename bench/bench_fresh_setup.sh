#!/usr/bin/env bash
# Benchmark: time scripts/setup.sh on a fresh clone with an empty cache (Caffe build, venv, data).
#   bash bench/bench_fresh_setup.sh
# Debian packages already installed on this machine are not re-installed, so their ~15 s is not included.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/clone"
start=$(date +%s)
CAFFE_EVO_CACHE="$work/cache" bash "$work/clone/scripts/setup.sh" > "$work/setup.log" 2>&1 \
  || { tail -20 "$work/setup.log"; exit 1; }
end=$(date +%s)
echo "fresh set-up (empty cache: Caffe build + venv + MNIST + Fashion-MNIST): $((end - start)) s on $(nproc) cores"
