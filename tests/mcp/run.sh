#!/usr/bin/env bash
# MCP system test: the official MCP Python SDK (PyPI `mcp`) as the client of a real agent and a
# real bot on the private containerd of `scripts/test-env.sh up` (needs root and
# `eval "$(scripts/test-env.sh env)"`; the image from scripts/build-image.sh ships mcp-fixture).
#
# Starts its own memoh-agent on a unique configuration (containerd namespace, CNI network,
# bridge, a free 10.2xx.y.0/24 subnet, temp dirs, MCP on a free loopback port), imports the
# test image, creates a bot, and runs tests/mcp/test_mcp_system.py against it, then the "agent"
# cases of tests/wire/test_aborts.py (foreign clients ending calls badly) and
# tests/wire/test_agent_socket.py (grpcio with default options, both container services)
# through the agent's socket (tests/wire/run.sh sets up its own venv, target/wire-venv). On exit, also
# after a failure, it deletes the bot, stops the agent and removes what it made: the
# containerd namespace, the bridge, the MASQUERADE and CNI nat rules and the isolation rule.
#
# Without the environment it prints "skipped" and exits 0; under CI it fails instead.
# Extra arguments go to the MCP pytest run (e.g. -k fixture, -x). MEMOH_AGENT_BIN picks the
# agent binary (default target/debug/memoh-agent, built if missing), MEMOH_TEST_SERVER_BIN the
# server binary the agent binds into the bot (default target/debug/container-server).
#
# `run.sh --bench [ARGS]` runs the benchmark tests/mcp/bench.py on the same setup instead
# (installs grpcio and grpcio-tools into the venv; use a release agent via MEMOH_AGENT_BIN).
set -eu
set -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV="$ROOT/target/mcp-venv"
BENCH=0
if [ "${1:-}" = "--bench" ]; then
    BENCH=1
    shift
fi

skip_or_fail() {
    if [ -n "${CI+x}" ]; then
        echo "mcp system test: $1 (required in CI: scripts/build-image.sh, scripts/test-env.sh up, eval \"\$(scripts/test-env.sh env)\")" >&2
        exit 1
    fi
    echo "skipped: $1"
    exit 0
}

[ "$(id -u)" = "0" ] || skip_or_fail "needs root"
[ -n "${MEMOH_TEST_CONTAINERD_SOCK:-}" ] || skip_or_fail "MEMOH_TEST_CONTAINERD_SOCK is not set"
[ -S "$MEMOH_TEST_CONTAINERD_SOCK" ] || skip_or_fail "containerd socket $MEMOH_TEST_CONTAINERD_SOCK does not exist"
[ -n "${MEMOH_TEST_IMAGE_TAR:-}" ] || skip_or_fail "MEMOH_TEST_IMAGE_TAR is not set"
[ -f "$MEMOH_TEST_IMAGE_TAR" ] || skip_or_fail "image archive $MEMOH_TEST_IMAGE_TAR does not exist"

PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
if [ ! -x "$VENV/bin/pytest" ] || ! "$VENV/bin/python" -c 'import mcp, httpx' 2>/dev/null; then
    echo "mcp: creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check mcp pytest httpx
fi
if [ "$BENCH" = "1" ] && ! "$VENV/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
    "$VENV/bin/pip" install -q --disable-pip-version-check grpcio grpcio-tools
fi

AGENT=${MEMOH_AGENT_BIN:-$ROOT/target/debug/memoh-agent}
if [ -z "${MEMOH_AGENT_BIN:-}" ] && [ ! -x "$AGENT" ]; then
    (cd "$ROOT" && cargo build --quiet -p memoh-agent)
fi
[ -x "$AGENT" ] || { echo "mcp: agent binary not found: $AGENT" >&2; exit 1; }
# The server the agent binds into the bot: the one the test image was built from
# (scripts/build-image.sh --binary target/debug/container-server), or MEMOH_TEST_SERVER_BIN.
SERVER=${MEMOH_TEST_SERVER_BIN:-$ROOT/target/debug/container-server}
if [ -z "${MEMOH_TEST_SERVER_BIN:-}" ] && [ ! -x "$SERVER" ]; then
    (cd "$ROOT" && cargo build --quiet -p container-server)
fi
[ -x "$SERVER" ] || { echo "mcp: server binary not found: $SERVER" >&2; exit 1; }

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A /24 in 10.200-249.x that no route uses yet.
pick_subnet() {
    local routes n second third prefix
    routes=$(ip -4 route show)
    for _ in $(seq 1 500); do
        n=$(( (RANDOM << 15 | RANDOM) ))
        second=$(( 200 + n % 50 ))
        third=$(( 100 + (n / 50) % 150 ))
        prefix="10.$second.$third"
        if ! grep -qF "$prefix." <<<"$routes"; then
            echo "$prefix"
            return
        fi
    done
    echo "mcp: no free 10.2xx.y.0/24 subnet" >&2
    exit 1
}

TAG=$(printf '%04x' $(( (RANDOM ^ $$) & 0xffff )))
DIR=$(mktemp -d /tmp/memoh-mcp-e2e.XXXXXX)
NS="memoh-mcp-$TAG"
NET="memoh-mcp-$TAG"
BRIDGE="mtm$TAG"
PREFIX=$(pick_subnet)
SUBNET="$PREFIX.0/24"
PORT=$(free_port)
BOT="mcp$TAG"
SOCK="$DIR/agent.sock"
AGENT_PID=""

cat >"$DIR/agent.toml" <<TOML
containerd_socket = "$MEMOH_TEST_CONTAINERD_SOCK"
namespace = "$NS"
cni_conf_dir = "$DIR/cni"
cni_network = "$NET"
cni_bridge = "$BRIDGE"
cni_subnet = "$SUBNET"
cni_ipam_dir = "$DIR/ipam"
state_dir = "$DIR/state"
data_root = "$DIR/data"
control_socket = "$SOCK"
mcp_listen = "127.0.0.1:$PORT"
mcp_idle_secs = 600
server_binary = "$SERVER"
TOML

cli() { "$AGENT" --socket "$SOCK" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != "0" ] && [ -f "$DIR/agent.log" ]; then
        echo "--- agent log (last 60 lines) ---" >&2
        tail -n 60 "$DIR/agent.log" >&2
    fi
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        timeout 60 "$AGENT" --socket "$SOCK" bot rm "$BOT" >/dev/null 2>&1
        kill -TERM "$AGENT_PID" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    # Whatever is left in the containerd namespace, then the namespace.
    local c=(ctr -a "$MEMOH_TEST_CONTAINERD_SOCK" -n "$NS")
    for t in $("${c[@]}" tasks ls -q 2>/dev/null); do "${c[@]}" tasks kill -s KILL "$t" >/dev/null 2>&1; sleep 0.2; "${c[@]}" tasks rm -f "$t" >/dev/null 2>&1; done
    for ct in $("${c[@]}" containers ls -q 2>/dev/null); do "${c[@]}" containers rm "$ct" >/dev/null 2>&1; done
    for i in $("${c[@]}" images ls -q 2>/dev/null); do "${c[@]}" images rm "$i" >/dev/null 2>&1; done
    for _ in 1 2 3 4 5; do
        local snaps
        snaps=$("${c[@]}" snapshots ls 2>/dev/null | awk 'NR>1 {print $1}')
        [ -n "$snaps" ] || break
        for s in $snaps; do "${c[@]}" snapshots rm "$s" >/dev/null 2>&1; done
    done
    for l in $("${c[@]}" leases ls -q 2>/dev/null); do "${c[@]}" leases rm "$l" >/dev/null 2>&1; done
    for d in $("${c[@]}" content ls -q 2>/dev/null); do "${c[@]}" content rm "$d" >/dev/null 2>&1; done
    ctr -a "$MEMOH_TEST_CONTAINERD_SOCK" namespaces rm "$NS" >/dev/null 2>&1
    [ -e "/run/netns/memoh-$BOT" ] && ip netns delete "memoh-$BOT" 2>/dev/null
    [ -e "/run/netns/memoh-$NS.$BOT" ] && ip netns delete "memoh-$NS.$BOT" 2>/dev/null
    [ -e "/sys/class/net/$BRIDGE" ] && ip link delete "$BRIDGE" 2>/dev/null
    while iptables -w 5 -t nat -D POSTROUTING -s "$SUBNET" ! -d "$SUBNET" -m comment --comment memoh-masq -j MASQUERADE 2>/dev/null; do :; done
    # The bridge plugin's per-container nat rules and chains of this network.
    iptables -w 5 -t nat -S 2>/dev/null | grep -F "name: \\\"$NET\\\"" | while read -r rule; do
        spec=${rule#-A }
        sh -c "iptables -w 5 -t nat -D $spec" 2>/dev/null
        chain=${spec##* }
        case "$chain" in CNI-*) iptables -w 5 -t nat -F "$chain" 2>/dev/null; iptables -w 5 -t nat -X "$chain" 2>/dev/null ;; esac
    done
    while iptables -w 5 -D MEMOH-ISOLATION -i "$BRIDGE" -o "$BRIDGE" -j DROP 2>/dev/null; do :; done
    # The shared isolation chain only when nothing else is left in it.
    if iptables -w 5 -S MEMOH-ISOLATION >/dev/null 2>&1 && ! iptables -w 5 -S MEMOH-ISOLATION | grep -q '^-A '; then
        while iptables -w 5 -D FORWARD -j MEMOH-ISOLATION 2>/dev/null; do :; done
        iptables -w 5 -X MEMOH-ISOLATION 2>/dev/null || iptables -w 5 -I FORWARD 1 -j MEMOH-ISOLATION
    fi
    rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "mcp: agent on namespace $NS, bridge $BRIDGE, subnet $SUBNET, mcp 127.0.0.1:$PORT" >&2
MEMOH_LOG=info,memoh_agent=debug "$AGENT" serve --config "$DIR/agent.toml" >"$DIR/agent.log" 2>&1 </dev/null &
AGENT_PID=$!
for _ in $(seq 1 600); do
    cli bot ls >/dev/null 2>&1 && break
    kill -0 "$AGENT_PID" 2>/dev/null || { echo "mcp: the agent exited before answering" >&2; exit 1; }
    sleep 0.1
done
cli bot ls >/dev/null

cli image import "$MEMOH_TEST_IMAGE_TAR" >/dev/null
cli bot create "$BOT"
# The fixture must be in the image and start inside the bot.
out=$(cli exec "$BOT" -- mcp-fixture </dev/null 2>&1) || true
grep -q "mcp-fixture started" <<<"$out" || { echo "mcp: mcp-fixture does not run in the bot: $out" >&2; exit 1; }

export MEMOH_MCP_URL="http://127.0.0.1:$PORT"
# MCP authentication is on by default: the agent generated a token; the operator reads it so.
MEMOH_MCP_TOKEN=$(cli mcp token)
export MEMOH_MCP_TOKEN
export MEMOH_MCP_BOT="$BOT"
export MEMOH_AGENT_SOCKET="$SOCK"
export MEMOH_AGENT_BIN="$AGENT"
export MEMOH_AGENT_STATE_DIR="$DIR/state"
cd "$HERE"
if [ "$BENCH" = "1" ]; then
    PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "$HERE/bench.py" "$@"
    exit
fi
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider -q "$@" "$HERE/test_mcp_system.py"

# Then the abort tests of tests/wire/test_aborts.py through this agent's socket, routed to the
# bot: only their "agent" cases (the "server" ones run in the wire tier), and a skip there
# counts as a failure. WIRE_SERVER_BIN keeps tests/wire/run.sh from building a server these
# cases never start.
echo "mcp: abort tests through the agent (tests/wire/test_aborts.py -k agent)" >&2
PYTHONDONTWRITEBYTECODE=1 WIRE_AGENT_SOCKET="$SOCK" WIRE_AGENT_BOT="$BOT" WIRE_FAIL_ON_SKIP=1 \
    WIRE_SERVER_BIN="${WIRE_SERVER_BIN:-$ROOT/target/debug/container-server}" \
    "$ROOT/tests/wire/run.sh" -k "test_aborts and agent" "$ROOT/tests/wire/test_aborts.py"

# grpcio with its default channel options on the agent's socket (the socket path as
# :authority), bridgepb and mcpcontainer routed to the bot.
echo "mcp: grpcio defaults on the agent's socket (tests/wire/test_agent_socket.py)" >&2
PYTHONDONTWRITEBYTECODE=1 WIRE_AGENT_SOCKET="$SOCK" WIRE_AGENT_BOT="$BOT" WIRE_FAIL_ON_SKIP=1 \
    WIRE_SERVER_BIN="${WIRE_SERVER_BIN:-$ROOT/target/debug/container-server}" \
    "$ROOT/tests/wire/run.sh" -k test_agent_socket "$ROOT/tests/wire/test_agent_socket.py"
