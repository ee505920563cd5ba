#!/usr/bin/env bash
# Times `vmcrypt serve` from exec to a listening socket ("waiting for a
# frontend" in its log), 10 starts each: local key store, KMIP (a PyKMIP
# server on loopback), and a raw image. Needs target/release/vmcrypt.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
V=$ROOT/target/release/vmcrypt
KMS=$ROOT/target/kms
bash "$ROOT/ci/kms.sh" setup "$KMS" >/dev/null
D=$(mktemp -d)
cd "$D"
bash "$ROOT/ci/kms.sh" start "$KMS" 25696 >/dev/null
bash "$ROOT/ci/kms.sh" config "$KMS" 25696 > kms.toml
$V create local.img --size 64M --keystore ./keys >/dev/null
$V create kmip.img --size 64M --kms kms.toml >/dev/null
measure() { # name args...
  local name=$1; shift
  local total=0 runs=10
  for i in $(seq 1 $runs); do
    rm -f s.sock log
    local t0=$(date +%s%N)
    $V serve --socket s.sock "$@" 2> log &
    local pid=$!
    until grep -q "waiting for a frontend" log 2>/dev/null; do sleep 0.0005; done
    local t1=$(date +%s%N)
    kill -TERM $pid; wait $pid || true
    total=$((total + (t1 - t0) / 1000))
  done
  echo "$name: mean $((total / runs)) us over $runs starts"
}
measure "local key store" --image local.img --keystore ./keys
measure "KMIP (PyKMIP on loopback)" --image kmip.img --kms kms.toml
truncate -s 64M raw.img; measure "raw image (no key)" --image raw.img
bash "$ROOT/ci/kms.sh" stop "$KMS"
rm -rf "$D"
