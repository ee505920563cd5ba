#!/usr/bin/env bash
# Starts libvirt's daemons (there is no systemd here) unless they run.
set -euo pipefail
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && { echo "libvirt: ready"; exit 0; }
  sleep 0.2
done
echo "libvirt: libvirtd did not answer" >&2
exit 1
