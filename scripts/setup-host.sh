#!/usr/bin/env bash
# Install the Debian packages edgevirt needs, only those that are missing.
# Idempotent and non-interactive: safe in CI (no stdin) and on a developer's machine.
set -euo pipefail

PACKAGES=(
  qemu-system-arm qemu-system-common qemu-utils 
  device-tree-compiler                          
  gcc-aarch64-linux-gnu linux-source-6.1        
  bc flex bison libssl-dev libelf-dev cpio kmod xz-utils make gcc
  u-boot-qemu u-boot-tools ser2net tftp-hpa atftp curl
  python3-venv python3-dev
)

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

# The guest's busybox comes from Debian's arm64 archive (apt-get download busybox-static:arm64).
need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding dpkg architecture arm64"
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_update -eq 1 ] || \
   ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
  echo "setup: apt-get update"
  $SUDO apt-get update -q -o APT::Get::List-Cleanup=0 >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >/tmp/edgevirt-apt.log 2>&1; then
    tail -20 /tmp/edgevirt-apt.log >&2
    echo "setup: apt-get install failed for: ${missing[*]} (log: /tmp/edgevirt-apt.log)" >&2
    exit 3
  fi
fi
echo "setup: host packages present"
