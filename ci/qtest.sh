#!/usr/bin/env bash
# Runs QEMU's own vhost-user-blk tests (tests/qtest/vhost-user-blk-test.c,
# part of qos-test) against vmcrypt, and against qemu-storage-daemon as a
# control, and prints both columns.
#
# QEMU is built from Debian's qemu source package, the same release as the
# installed QEMU: only qemu-system-x86_64 and qos-test. The build is kept in
# $QTEST_DIR (default target/qtest) and reused when present.
#
#   bash ci/qtest.sh [VMCRYPT_BINARY]
#
# Exits non-zero when a test fails under vmcrypt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${QTEST_DIR:-$root/target/qtest}
vmcrypt=${1:-$root/target/debug/vmcrypt}
mkdir -p "$work"

build() {
  local b
  b=$(ls -d "$work"/qemu-*/build 2>/dev/null | head -1 || true)
  if [ -n "$b" ] && [ -x "$b/tests/qtest/qos-test" ] && [ -x "$b/qemu-system-x86_64" ]; then
    echo "$b"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(meson ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev dpkg-dev pkg-config)
  if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
  fi
  # A deb-src entry only for this download, removed afterwards.
  local list=/etc/apt/sources.list.d/vmcrypt-qtest-src.sources
  sed -n 's/^Types: deb$/Types: deb-src/; p' /etc/apt/sources.list.d/debian.sources > "$list"
  trap 'rm -f '"$list" RETURN
  apt-get update -q -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0 >&2
  local ver
  # A binNMU (+bN) has the source version without the suffix.
  ver=$(dpkg-query -W -f '${source:Version}' qemu-system-x86)
  (cd "$work" && apt-get source -q "qemu=$ver" >&2)
  rm -f "$list"
  local src
  src=$(ls -d "$work"/qemu-*/ | head -1)
  mkdir -p "$src/build"
  (
    cd "$src/build"
    ../configure --target-list=x86_64-softmmu --enable-tools --enable-vhost-user \
      --enable-vhost-user-blk-server --disable-docs --disable-werror \
      --disable-gtk --disable-sdl --disable-vnc --disable-opengl --disable-virglrenderer \
      --disable-spice --disable-curses --disable-brlapi --disable-libusb \
      --disable-usb-redir --disable-xen --disable-slirp --disable-capstone \
      --disable-guest-agent --disable-fuse --disable-vde --disable-netmap \
      --disable-rbd --disable-glusterfs --disable-libiscsi --disable-libnfs \
      --disable-libssh --disable-smartcard --disable-seccomp --disable-gnutls \
      --disable-nettle --disable-gcrypt --disable-linux-aio --disable-linux-io-uring \
      --disable-alsa --disable-pa --disable-jack --disable-oss --disable-sndio \
      --disable-coreaudio --disable-dsound >&2
    ninja qemu-system-x86_64 tests/qtest/qos-test >&2
  )
  echo "${src%/}/build"
}

# The source package carries no firmware: link the installed copies where
# the uninstalled binary looks (its relocated data directory).
link_firmware() {
  local data=$1/qemu-bundle/usr/local/share/qemu f
  mkdir -p "$data"
  for f in /usr/share/qemu/* /usr/share/seabios/* /usr/lib/ipxe/qemu/*; do
    [ -e "$data/${f##*/}" ] || [ -L "$data/${f##*/}" ] || ln -s "$f" "$data/${f##*/}"
  done
}

build_dir=$(build)
link_firmware "$build_dir"
[ "${QTEST_BUILD_ONLY:-}" ] && exit 0
qos=$build_dir/tests/qtest/qos-test
prefix=/x86_64/pc/i440FX-pcihost/pci-bus-pc/pci-bus/vhost-user-blk-pci
tests=(
  vhost-user-blk-pci-tests/idx
  vhost-user-blk-pci-tests/nxvirtq
  vhost-user-blk-pci-tests/hotplug
  vhost-user-blk-pci-tests/multiqueue
  vhost-user-blk/vhost-user-blk-tests/basic
  vhost-user-blk/vhost-user-blk-tests/indirect
)
[ -x "$vmcrypt" ] || { echo "qtest: no vmcrypt binary at $vmcrypt (cargo build first)" >&2; exit 1; }
logs=$work/logs
rm -rf "$logs"
mkdir -p "$logs"

# One qos-test process per test: a failed assertion aborts the process.
run() { # daemon-name daemon-binary test -> prints pass/FAIL
  local name=$1 bin=$2 t=$3 log
  log=$logs/$name-${t##*/}.log
  if (cd "$build_dir" && QTEST_QEMU_BINARY=./qemu-system-x86_64 \
      QTEST_QEMU_STORAGE_DAEMON_BINARY=$bin VMCRYPT=$vmcrypt \
      timeout 120 "$qos" -p "$prefix/$t") >"$log" 2>&1; then
    echo pass
  else
    echo FAIL
  fi
}

failed=0
printf '%-45s %-20s %s\n' test qemu-storage-daemon vmcrypt
for t in "${tests[@]}"; do
  q=$(run qsd /usr/bin/qemu-storage-daemon "$t")
  v=$(run vmcrypt "$root/ci/qsd-as-vmcrypt.py" "$t")
  printf '%-45s %-20s %s\n' "${t##*/}" "$q" "$v"
  if [ "$v" != pass ]; then
    failed=1
    echo "--- vmcrypt: $t (log $logs/vmcrypt-${t##*/}.log)"
    tail -n 30 "$logs/vmcrypt-${t##*/}.log"
  fi
done
exit $failed
