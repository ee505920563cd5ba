#!/usr/bin/env bash
# The quick start: installs what vmcrypt needs, builds it, serves a disk
# image and boots a QEMU guest that runs fio with verification on it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh
cargo build --release -p vmcrypt
VMCRYPT_BIN="$PWD/target/release/vmcrypt" cargo test --release -p guest-tests -- --nocapture raw_disk_boots_and_fio_verify_passes
