#!/usr/bin/env bash
# Install the Debian packages edgevirt needs, only those that are missing.
# The list is edgevirt/hostreqs.py's table (the one `edgevirt doctor` probes), never a
# second hand-kept list. Usage: setup-host.sh [demo|test] (default: test, i.e. everything).
# Idempotent and non-interactive: safe in CI (no stdin) and on a developer's machine.
# apt's output goes to a log; this prints one line per step.
set -euo pipefail

target=${1:-test}
here=$(cd "$(dirname "$0")/.." && pwd)
log=${EDGEVIRT_SETUP_LOG:-/tmp/edgevirt-setup.log}
# -P: do not put edgevirt/ on sys.path (its modules must not shadow the standard library).
mapfile -t PACKAGES < <(python3 -P "$here/edgevirt/hostreqs.py" packages "$target")
[ ${#PACKAGES[@]} -gt 0 ] || { echo "setup: no package list for '$target'" >&2; exit 2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install packages" >&2; exit 3; }
  SUDO="sudo -n"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# The guest's busybox and the service VM's Python come from Debian's arm64 archive.
need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding dpkg architecture arm64"
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_update -eq 1 ] || \
   ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
  echo "setup: apt-get update"
  if ! $SUDO apt-get update -q -o APT::Get::List-Cleanup=0 >>"$log" 2>&1; then
    tail -5 "$log" >&2; echo "setup: apt-get update failed (log: $log)" >&2; exit 3
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >>"$log" 2>&1; then
    tail -20 "$log" >&2
    echo "setup: apt-get install failed for: ${missing[*]} (log: $log)" >&2
    exit 3
  fi
fi
echo "setup: ${#PACKAGES[@]} host packages present for '$target'"
