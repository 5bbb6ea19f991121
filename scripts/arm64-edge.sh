#!/usr/bin/env bash
# fedge's Raspberry Pi path, executed under qemu-user emulation (not on a Pi).
#
#   sudo scripts/arm64-edge.sh [CHECKOUT]      (default CHECKOUT: the repo this script is in)
#
# 1. Builds (once; reused afterwards) a Debian bookworm arm64 root, what Raspberry Pi OS 64-bit
#    is, with debootstrap + qemu-user-static, in $FEDGE_ARM64_ROOT (default /var/tmp/fedge-arm64).
# 2. Installs CHECKOUT[edge] with the aarch64 wheels from PyPI into a fresh venv in that root.
# 3. Measures the venv's site-packages size and the cold import of the edge ClientApp there.
# 4. Starts `fedge deploy`'s TLS SuperLink + Fleet gateway on 127.0.0.1 with two x86 torch
#    SuperNodes, and an edge SuperNode (edge=true, partition 2 of 3) inside the arm64 root; runs
#    3 rounds with an int8 backbone; then, with the arm64 node stopped, the same run twice more
#    (the second time as a control), to compare the final global head with and without it.
# 5. Prints one JSON object (also written to $FEDGE_ARM64_OUT/result.json), with
#    "federation_error" next to what was measured if the federation did not finish (exit 1).
#
# Everything listens on 127.0.0.1 only. The chroot gets /proc and /dev, never /sys
# (onnxruntime's cpuinfo crashes on the host's /sys under qemu). Processes are stopped and
# the mounts released on exit, failure included; the root itself is kept for the next run.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_ONLY=false
if [[ ${1:-} == --build-only ]]; then BUILD_ONLY=true; shift; fi
CHECKOUT=$(cd "${1:-$SCRIPT_DIR/..}" && pwd)
ROOT=${FEDGE_ARM64_ROOT:-/var/tmp/fedge-arm64}
OUT=${FEDGE_ARM64_OUT:-/var/tmp/fedge-arm64-run}
ROUNDS=${FEDGE_ARM64_ROUNDS:-3}
HOST_PYTHON=${FEDGE_HOST_PYTHON:-python3}
VENV=/opt/fedge-venv # inside the root
SRC=/opt/fedge-src   # inside the root: a copy of CHECKOUT's files
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[arm64-edge] %s\n' "$*" >&2; }

debian_mirror() {
  # The Debian mirror this machine's apt uses (deb822 "URIs:" or one-line "deb URL suite").
  local uri
  uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    | grep -v security \
    | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
    | awk '{print $1; exit}')
  echo "${uri:-http://deb.debian.org/debian}"
}

ensure_binfmt() {
  command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null \
    || apt-get install -y qemu-user-static debootstrap >&2
  mountpoint -q /proc/sys/fs/binfmt_misc \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
  fi
}

build_root() {
  if [[ -e $ROOT/.fedge-root-ok ]]; then
    log "reusing the arm64 root $ROOT"
    return
  fi
  unmount_root
  rm -rf "$ROOT"
  log "debootstrap bookworm arm64 into $ROOT (several minutes)"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOT" "$(debian_mirror)" >&2
  touch "$ROOT/.fedge-root-ok"
}

mount_root() {
  # /proc and /dev only: not /sys (see the header).
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
}

unmount_root() {
  local m
  for m in dev proc; do
    if mountpoint -q "$ROOT/$m" 2>/dev/null; then umount -l "$ROOT/$m"; fi
  done
}

in_root() {
  # A command inside the root with a clean environment (no host PYTHONPATH or paths).
  chroot "$ROOT" /usr/bin/env -i PATH="$VENV/bin:$GUEST_PATH" HOME=/root LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 "$@"
}

source_stamp() {
  # What pip installs from CHECKOUT: its path and the content of pyproject.toml and fedge/.
  echo "$CHECKOUT"
  (cd "$CHECKOUT" && git ls-files -z --cached --others --exclude-standard -- pyproject.toml fedge \
    | xargs -0 sha256sum)
}

install_fedge() {
  local stamp
  stamp=$(source_stamp | sha256sum | cut -d' ' -f1)
  if [[ $(cat "$ROOT$VENV/.fedge-stamp" 2>/dev/null) == "$stamp" ]]; then
    log "reusing $ROOT$VENV: fedge[edge] from this checkout is installed there"
    return
  fi
  # Network settings the root needs to reach PyPI as this machine does.
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp "$(realpath /etc/ssl/certs/ca-certificates.crt)" "$ROOT/etc/ssl/certs/ca-certificates.crt"
  [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
  log "copying $CHECKOUT (tracked and unignored files) to $ROOT$SRC"
  rm -rf "${ROOT:?}$SRC" "${ROOT:?}$VENV"
  mkdir -p "$ROOT$SRC"
  git -C "$CHECKOUT" ls-files -z --cached --others --exclude-standard \
    | (cd "$CHECKOUT" && xargs -0 -r cp --parents -t "$ROOT$SRC" 2>/dev/null || true)
  log "pip install '$SRC[edge]' into a fresh venv in the root (slow under emulation)"
  in_root python3 -m venv "$VENV"
  in_root "$VENV/bin/pip" install --only-binary=:all: --no-binary=fedge \
    --cert /etc/ssl/certs/ca-certificates.crt "$SRC[edge]" >&2
  in_root "$VENV/bin/pip" list --format=freeze >"$ROOT$VENV/pip-freeze.txt"
  echo "$stamp" >"$ROOT$VENV/.fedge-stamp"
}

measure_install() {
  local site bytes
  site=$(in_root "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  bytes=$(du -sb "$ROOT$site" | cut -f1)
  cp "$ROOT$VENV/pip-freeze.txt" "$OUT/pip-freeze.txt"
  log "site-packages: $bytes bytes"
  # Cold import of what an edge node's first message loads (the ClientApp and its edge
  # backend): a fresh interpreter each time, three times.
  local probe='import sys, time
t = time.perf_counter()
import fedge.client_app.app, fedge.edge.client
dt = time.perf_counter() - t
stack = {"torch", "sklearn", "scipy", "pandas", "pyarrow", "datasets", "matplotlib"}
heavy = sorted({m.split(".")[0] for m in sys.modules} & stack)
print("%.3f %s" % (dt, ",".join(heavy) or "-"))'
  local runs=() heavy=""
  for _ in 1 2 3; do
    read -r t heavy < <(in_root "$VENV/bin/python" -c "$probe")
    runs+=("$t")
  done
  log "edge ClientApp import (s): ${runs[*]}; heavy modules loaded: $heavy"
  printf '{"site_packages_bytes": %s, "import_seconds": [%s], "import_loaded": "%s"}\n' \
    "$bytes" "$(IFS=,; echo "${runs[*]}")" "$heavy" >"$OUT/install.json"
}

processes_in_root() {
  # Pids whose root directory is our arm64 root: only this script starts those.
  local proc
  for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/root" 2>/dev/null) == "$ROOT" ]] && echo "${proc#/proc/}"
  done
  return 0
}

cleanup() {
  local code=$? pid
  trap - EXIT INT TERM
  if [[ -n ${DRIVER_PID:-} ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill "$DRIVER_PID" 2>/dev/null || true # it stops the federation it started
    wait "$DRIVER_PID" 2>/dev/null || true
  fi
  for pid in $(processes_in_root); do
    log "stopping leftover process $pid in the root"
    kill -KILL "$pid" 2>/dev/null || true
  done
  unmount_root
  exit "$code"
}

main() {
  [[ $(id -u) -eq 0 ]] || { log "run as root (debootstrap, binfmt_misc, chroot)"; exit 2; }
  mkdir -p "$OUT"
  trap cleanup EXIT INT TERM
  ensure_binfmt
  build_root
  mount_root
  install_fedge
  measure_install
  log "federation: SuperLink + 2 x86 torch SuperNodes on 127.0.0.1, 1 arm64 edge SuperNode"
  # The driver (host side, fedge from CHECKOUT) stops every process it started, even on error.
  PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}" FEDGE_ARM64_ROOT="$ROOT" FEDGE_ARM64_VENV="$VENV" \
    FEDGE_ARM64_OUT="$OUT" FEDGE_ARM64_ROUNDS="$ROUNDS" FEDGE_CHECKOUT="$CHECKOUT" \
    "$HOST_PYTHON" "$SCRIPT_DIR/arm64_federation.py" &
  DRIVER_PID=$!
  local status=0
  wait "$DRIVER_PID" || status=$?
  DRIVER_PID=
  # One JSON object, also when the federation failed (then it holds "federation_error").
  cat "$OUT/result.json"
  return "$status"
}

if $BUILD_ONLY; then
  ensure_binfmt
  build_root
else
  main
fi
