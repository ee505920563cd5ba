#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets) for a bounded time with
# cargo-fuzz (libFuzzer, AddressSanitizer) on the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags). Starts from the seeds
# in fuzz/seeds/TARGET plus what earlier runs found (fuzz/corpus/TARGET).
# A crash, a hang (-timeout) or a runaway allocation (-rss_limit_mb) fails
# the run and leaves the input in fuzz/artifacts/TARGET.
#
#   bash ci/fuzz.sh [SECONDS_PER_TARGET]     (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
tools=$PWD/target/tools
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
  cargo install cargo-fuzz --locked --version 0.13.2 --root "$tools"
fi
export PATH=$tools/bin:$PATH RUSTC_BOOTSTRAP=1
cd fuzz
for t in request luks_header settings; do
  mkdir -p "corpus/$t"
  echo "== fuzz $t for ${seconds}s"
  log=../target/fuzz-$t.log
  if ! cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz $t: FAILED (input in fuzz/artifacts/$t, log $log)"
    exit 1
  fi
  grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)" "$log" || true
done
