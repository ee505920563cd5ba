#!/usr/bin/env bash
# Runs every vmcrypt test: installs what they need, then lint, unit,
# integration, guest (QEMU) tests and a benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh
# PyKMIP in a venv and a throwaway PKI; the tests start their own servers.
bash ci/kms.sh setup target/kms
bash ci/libvirt.sh

echo "== format and lints"
cargo fmt --all -- --check
python3 ci/check-docs.py
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
cargo test --workspace

echo "== QEMU's own vhost-user-blk tests (qos-test), vmcrypt and qemu-storage-daemon"
bash ci/qtest.sh "$PWD/target/debug/vmcrypt"

echo "== fuzzing, bounded (request parser, LUKS1 header, settings)"
bash ci/fuzz.sh 30

echo "== benchmark smoke run (checks the tool, not the speed)"
cargo build --release -p vmcrypt -p vmcrypt-bench
target/release/vmcrypt-bench --quick --out target/bench-quick > /dev/null
target/release/vmcrypt-bench --quick --cache none --targets raw,luks --no-xts \
  --out target/bench-quick-none > /dev/null
target/release/vmcrypt-bench --quick --targets rbd,rbd-luks --no-xts --queues 1 \
  --out target/bench-quick-rbd > /dev/null
echo "benchmark smoke run: ok"

echo "== Debian package: build, lintian, install, man pages, units, completions, remove"
bash ci/package.sh --check
