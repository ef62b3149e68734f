#!/usr/bin/env bash
# Build and run caffe-evo's CPU image with docker or podman.
#
#   scripts/docker.sh build            build caffe-evo:cpu from docker/Dockerfile (log: $STATE/build.log)
#   scripts/docker.sh run ARGS...      caffe-evo ARGS in the image, $CAFFE_EVO_RUNS (default runs/docker) at /runs
#   scripts/docker.sh test [ARGS...]   build, then inside the image: the test suite (pytest ARGS) and
#                                      `reproduce lenet5-mnist --quick`
#
# The engine is docker when a docker daemon answers, else podman; on a root Debian machine with neither,
# podman, runc and debootstrap are installed. When no debian:12 image can be pulled, one is made with
# debootstrap from this machine's own apt mirror. The host's extra certificate authorities
# (/usr/local/share/ca-certificates/*.crt, as behind a TLS-inspecting proxy) are copied into the build
# context, so that apt, pip and npm in the build trust what the host trusts.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${CAFFE_EVO_IMAGE:-caffe-evo:cpu}
BASE=docker.io/library/debian:12
STATE=${CAFFE_EVO_CACHE:-$HOME/.cache/caffe-evo}/docker
IMAGE_UID=1000 # the image's non-root user (docker/Dockerfile)
mkdir -p "$STATE"

say() { printf '[docker.sh] %s\n' "$*" >&2; }
fail() { printf 'docker.sh: %s\n' "$*" >&2; exit 1; }

is_root_debian() { [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; }

pick_engine() {
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
    return
  fi
  if ! command -v podman >/dev/null 2>&1; then
    is_root_debian || fail "neither a working docker nor podman; install one (Debian: apt-get install podman runc)"
    say "installing podman, runc and debootstrap"
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null \
      || fail "apt-get install podman runc debootstrap failed"
  fi
  ENGINE=podman
  # podman's defaults fail on some kernels: crun cannot use hybrid cgroups and the default rlimits exceed
  # what an unprivileged container host grants. runc and limits within the host's own work everywhere.
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    local nofile nproc
    nofile=$(ulimit -Hn)
    { [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; } && nofile=1048576
    nproc=$(ulimit -Hu)
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    {
      echo '[containers]'
      echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
      if command -v runc >/dev/null 2>&1; then
        echo '[engine]'
        echo 'runtime = "runc"'
      fi
    } >"$STATE/containers.conf"
    export CONTAINERS_CONF=$STATE/containers.conf
  fi
}

# The first Debian and Debian-security URIs of this machine's apt sources (deb822 or one-line format).
apt_uri() {
  local want=$1 uri
  uri=$(
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'; } \
      | grep -E '^https?://' | grep -E "$want" | head -n1
  ) || true
  echo "$uri"
}

ensure_base() {
  if $ENGINE image exists "$BASE" 2>/dev/null || $ENGINE image inspect "$BASE" >/dev/null 2>&1; then
    return
  fi
  say "pulling $BASE (once, 60 s at most)"
  if timeout 60 $ENGINE pull -q "$BASE" >"$STATE/pull.log" 2>&1; then
    return
  fi
  say "no $BASE to pull ($(tail -n1 "$STATE/pull.log")); making one with debootstrap"
  is_root_debian || fail "cannot pull $BASE and cannot debootstrap one (needs root on Debian)"
  command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
    || fail "apt-get install debootstrap failed"
  local mirror security root
  mirror=$(apt_uri '/debian/?$')
  security=$(apt_uri 'security')
  mirror=${mirror:-http://deb.debian.org/debian}
  security=${security:-http://deb.debian.org/debian-security}
  root=$(mktemp -d "$STATE/debian12.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
    || fail "debootstrap from $mirror failed: $(tail -n1 "$STATE/debootstrap.log")"
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | $ENGINE import - "$BASE" >/dev/null || fail "importing the debootstrapped base failed"
  rm -rf "$root"
  trap - EXIT
  say "made $BASE from $mirror"
}

stage_certificates() {
  # Only *.crt files count for Debian's update-ca-certificates; the folder itself stays in git.
  find docker/extra-ca -name '*.crt' -delete
  if [ -d /usr/local/share/ca-certificates ]; then
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} docker/extra-ca/ \;
  fi
}

build() {
  pick_engine
  ensure_base
  stage_certificates
  local log=$STATE/build.log start=$SECONDS
  say "$ENGINE build -t $IMAGE (log: $log)"
  local pull=()
  [ "$ENGINE" = podman ] && pull=(--pull=never)
  rm -f "$STATE/image-id"
  # The image id file is written only by a build that finished (a killed podman build can exit 0).
  if ! $ENGINE build "${pull[@]}" --iidfile "$STATE/image-id" -f docker/Dockerfile -t "$IMAGE" . >"$log" 2>&1 \
    || [ ! -s "$STATE/image-id" ]; then
    tail -n 40 "$log" >&2
    fail "image build failed (full log: $log)"
  fi
  say "built $IMAGE in $((SECONDS - start)) s"
}

run_image() {
  pick_engine
  local runs=${CAFFE_EVO_RUNS:-$PWD/runs/docker}
  if [ ! -d "$runs" ]; then
    mkdir -p "$runs"
    # A folder made here for a root caller goes to the image's user, who writes the outputs.
    [ "$(id -u)" = 0 ] && chown "$IMAGE_UID:$IMAGE_UID" "$runs"
  fi
  local user=()
  [ "$(id -u)" != 0 ] && user=(--user "$(id -u):$(id -g)")
  $ENGINE run --rm "${user[@]}" -v "$runs:/runs" "$IMAGE" "$@"
}

test_image() {
  build
  say "test suite inside $IMAGE"
  # Ray's object store wants more shared memory than the engines' 64 MB default.
  $ENGINE run --rm --shm-size=1g --workdir /opt/caffe-evo --entrypoint /opt/caffe-evo/.venv/bin/python "$IMAGE" \
    -m pytest -p no:cacheprovider "$@"
  say "reproduce lenet5-mnist --quick inside $IMAGE"
  local runs
  runs=$(mktemp -d "$STATE/test-runs.XXXXXX")
  [ "$(id -u)" = 0 ] && chown "$IMAGE_UID:$IMAGE_UID" "$runs"
  CAFFE_EVO_RUNS=$runs run_image reproduce lenet5-mnist --quick --no-progress
  rm -rf "$runs"
}

case "${1:-}" in
  build) build ;;
  run) shift; run_image "$@" ;;
  test) shift; test_image "$@" ;;
  *) fail "usage: scripts/docker.sh build | run CAFFE-EVO-ARGS... | test [PYTEST-ARGS...]" ;;
esac
