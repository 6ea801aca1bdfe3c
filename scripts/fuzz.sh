#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each, one after another, then
# minimizes its corpus, and prints one line per target: runs, corpus size, crashes found.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
# Usage: scripts/fuzz.sh [--seconds N] [TARGET...]     (default 600 s, all targets)
# Findings land in fuzz/artifacts/TARGET/ and are copied to fuzz/regressions/TARGET/ (commit
# them: the tests replay them with the corpora); the run exits non-zero when any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=600
if [ "${1:-}" = "--seconds" ]; then
    SECONDS_EACH=$2
    shift 2
fi
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi

LOG_DIR=target/fuzz-logs
mkdir -p "$LOG_DIR"
cargo +nightly fuzz build >/dev/null

status=0
results=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    log="$LOG_DIR/$t.log"
    before=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    echo "=== $t: ${SECONDS_EACH} s" >&2
    if ! cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1; then
        status=1
    fi
    runs=$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n 1)
    # Keep the committed corpus small: only inputs that add coverage.
    cargo +nightly fuzz cmin "$t" "corpus/$t" >"$LOG_DIR/$t.cmin.log" 2>&1 || true
    after=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    # Findings stay for good in regressions/ (committed, replayed by the tests, never
    # minimized away).
    if [ "$after" -gt 0 ]; then
        mkdir -p "regressions/$t"
        cp -n "artifacts/$t"/* "regressions/$t/"
    fi
    results+=("$t: ${runs:-?} runs in ${SECONDS_EACH} s, corpus $(find "corpus/$t" -type f | wc -l) inputs, new crashes $((after - before))")
done
printf '%s\n' "${results[@]}"
exit $status
