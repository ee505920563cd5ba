#!/usr/bin/env bash
# The quick start: installs what vmcrypt needs, builds it, creates an
# encrypted image (its key in the embedded local key store: no KMS needed),
# serves it, and boots a QEMU guest that runs fio with verification on it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh
cargo build --release -p vmcrypt
VMCRYPT_BIN="$PWD/target/release/vmcrypt" \
  cargo test --release -p guest-tests --test guest -- --nocapture --exact encrypted_disk_boots_and_fio_verify_passes
echo
echo "vmcrypt served an encrypted disk to a QEMU guest; fio verified every block it wrote."
echo "Next: README.md and docs/ (serving your own image, libvirt, KMIP), target/release/vmcrypt --help"
