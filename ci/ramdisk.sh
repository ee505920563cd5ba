#!/bin/bash
# A RAM-backed disk for benchmarks whose device should not set the pace:
# an ext4 file system on a loop device over a file in /dev/shm. Direct I/O
# works on it (tmpfs alone refuses O_DIRECT), so `vmcrypt-bench --cache none
# --out DIR` measures the servers' CPU cost per I/O, as on a fast NVMe
# drive, rather than this machine's virtual disk. The loop device's kernel
# thread copies every request on the host's CPUs, so the servers share them
# with it. Needs root.
#
#   ci/ramdisk.sh up DIR [SIZE_MIB]   (default 3072)
#   ci/ramdisk.sh down DIR
set -euo pipefail

cmd=${1:-}
dir=${2:-}
size=${3:-3072}
backing=/dev/shm/vmcrypt-ramdisk.img

case "$cmd" in
up)
    [ -n "$dir" ] || { echo "usage: $0 up DIR [SIZE_MIB]" >&2; exit 2; }
    if mountpoint -q "$dir"; then
        echo "ramdisk: $dir is mounted already" >&2
        exit 1
    fi
    truncate -s "${size}M" "$backing"
    dev=$(losetup --find --show "$backing")
    mkfs.ext4 -q "$dev"
    mkdir -p "$dir"
    mount "$dev" "$dir"
    echo "ramdisk: $dev (${size} MiB in $backing) mounted on $dir"
    ;;
down)
    [ -n "$dir" ] || { echo "usage: $0 down DIR" >&2; exit 2; }
    if mountpoint -q "$dir"; then
        dev=$(findmnt -n -o SOURCE --mountpoint "$dir")
        umount "$dir"
        case "$dev" in /dev/loop*) losetup -d "$dev" ;; esac
    fi
    rm -f "$backing"
    echo "ramdisk: $dir released"
    ;;
*)
    echo "usage: $0 up DIR [SIZE_MIB] | down DIR" >&2
    exit 2
    ;;
esac
