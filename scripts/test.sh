#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds once, then runs the tiers in
# order and prints each runner's summary lines.
#
#   1. checks      cargo fmt --check, cargo clippy -D warnings
#   2. unit        pure logic next to the code (cargo test --lib --bins)
#   3. in-process  the real server on temp sockets (tests/*.rs), and the independent Python
#                  wire-compatibility client (tests/wire)
#   4. system      a private containerd with runc, CNI and iptables, a loopback registry
#                  (agent/tests/*.rs), and MCP with the official Python SDK (tests/mcp);
#                  needs root
#
# Usage: scripts/test.sh [--skip-checks] [--no-system]
# Every tier runs even when an earlier one failed; the exit code is non-zero if any failed.
set -eu
set -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SKIP_CHECKS=0
SYSTEM=1
for a in "$@"; do
    case "$a" in
        --skip-checks) SKIP_CHECKS=1 ;;
        --no-system) SYSTEM=0 ;;
        *) echo "test.sh: unknown option $a" >&2; exit 2 ;;
    esac
done

LOG_DIR="$ROOT/target/test-logs"
rm -rf "$LOG_DIR"
mkdir -p "$LOG_DIR"
FAILED=()
SUMMARY=()

# Runs a named step, keeps its output in a log, echoes the runner's summary lines.
step() {
    local name=$1
    shift
    local log="$LOG_DIR/$name.log"
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@" >"$log" 2>&1; then
        SUMMARY+=("ok      $name ($((SECONDS - start)) s)")
    else
        FAILED+=("$name")
        SUMMARY+=("FAILED  $name ($((SECONDS - start)) s), log: $log")
        # The panics first (they may be far from the end of a long log), then the tail.
        grep -a -A12 -E 'panicked at|^FAILED|^E  ' "$log" | grep -av -E '^.{0,12}[0-9]{4}-[0-9]{2}-[0-9]{2}T|^time=' \
            | head -n 150 | sed 's/^/    /' || true
        echo "    ..."
        tail -n 40 "$log" | sed 's/^/    /'
    fi
    grep -E '^test result:|[0-9]+ passed|[0-9]+ failed' "$log" | grep -vE '^test [^ ]+ \.\.\. ' | tail -n 40 || true
}

if [ "$(id -u)" = "0" ]; then
    scripts/install-deps.sh
elif [ "$SYSTEM" = "1" ]; then
    echo "test.sh: the system tier needs root (containerd, CNI, iptables)" >&2
    exit 2
fi

export CARGO_TERM_COLOR=never
echo "=== build"
cargo build --workspace --all-targets 2>&1 | tail -n 3

if [ "$SKIP_CHECKS" = "0" ]; then
    step fmt cargo fmt --all -- --check
    step clippy cargo clippy --workspace --all-targets -- -D warnings
fi

# Test targets by tier. Every test file must belong to one (checked below), so none is skipped
# by accident: in-process ones are tests/server_*.rs, */tests/fuzz_corpus.rs and
# agent/tests/mcp_tools.rs; system ones are agent/tests/*_system.rs and control_malformed.rs.
# The whole workspace stays selected so cargo reuses the build above.
IN_PROCESS=(--test 'server_*' --test fuzz_corpus --test mcp_tools)
SYSTEM_TESTS=(--test '*_system' --test control_malformed)
for f in tests/*.rs container-server/tests/*.rs agent/tests/*.rs; do
    [ -e "$f" ] || continue
    case "$(basename "$f" .rs)" in
        server_* | fuzz_corpus | mcp_tools | *_system | control_malformed) ;;
        *) echo "test.sh: $f belongs to no tier; name it or add it to a tier" >&2; exit 2 ;;
    esac
done

step unit cargo test --workspace --lib --bins --no-fail-fast
step in-process cargo test --workspace --no-fail-fast "${IN_PROCESS[@]}"
step wire tests/wire/run.sh

if [ "$SYSTEM" = "1" ]; then
    cleanup() { scripts/test-env.sh down >"$LOG_DIR/test-env-down.log" 2>&1 || true; }
    trap cleanup EXIT
    echo "=== image: test image from the debug server build"
    scripts/build-image.sh --binary target/debug/container-server \
        >"$LOG_DIR/image.log" 2>&1 || { tail -n 30 "$LOG_DIR/image.log"; FAILED+=("image"); }
    scripts/test-env.sh up >"$LOG_DIR/test-env-up.log" 2>&1 || { tail -n 30 "$LOG_DIR/test-env-up.log"; FAILED+=("test-env"); }
    eval "$(scripts/test-env.sh env)"
    export CI=${CI:-}
    # System tests share one containerd and the host's network: one test binary at a time.
    step system cargo test --workspace --no-fail-fast "${SYSTEM_TESTS[@]}" -- --test-threads 2
    # MCP through the official Python SDK against a real agent and bot (its own config, cleaned up).
    step mcp tests/mcp/run.sh
fi

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
# One closing line over every runner: cargo's "test result:" lines and pytest's summaries.
totals=$(cat "$LOG_DIR"/*.log 2>/dev/null | awk '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
    /^[0-9]+ (passed|failed)/ && / in [0-9.]+s/ {
        for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
    }
    END { printf "%d passed, %d failed\n", p, f }')
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed tiers: ${FAILED[*]}"
    echo "$totals"
    exit 1
fi
echo "all tiers passed"
echo "$totals"
