#!/usr/bin/env bash
# Installs the system packages vmcrypt's tests need (Debian 12).
# Idempotent: does nothing when everything is already present.
set -euo pipefail

need=()
for cmd in qemu-system-x86_64 qemu-storage-daemon qemu-img qemu-io fio cryptsetup libvirtd virtlogd virsh openssl mkfs.xfs ceph-mon ceph-osd rbd; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ -x /bin/busybox ] || need+=(busybox)
if [ ${#need[@]} -eq 0 ]; then
  echo "install-deps: all tools present"
  exit 0
fi
echo "install-deps: missing ${need[*]}; installing"

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# The machine may ship qemu-utils from backports; qemu-system-x86 from bookworm
# conflicts with it. Pin qemu-utils to the same version as qemu-system-x86.
qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
apt-get install -y -q --allow-downgrades --no-install-recommends \
  "qemu-system-x86=$qver" "qemu-utils=$qver" "qemu-system-common=$qver" \
  "qemu-block-extra=$qver" qemu-system-data \
  fio cryptsetup-bin busybox-static openssl python3-venv xfsprogs \
  ceph-mon ceph-osd ceph-common \
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
