#!/usr/bin/env bash
# The main job on a fresh machine: builds everything, brings up a bot and shows it working.
#
# It installs the Debian packages, builds the workspace and the memohai/mcp image (daemonless),
# starts a private containerd (never the system one), starts memoh-agent on it with a demo
# configuration, imports the image, creates the bot "demo", and runs commands in it through the
# agent: exec, a file copied in and out, a process that outlives its call, a version taken
# while the bot runs and rolled back. Then it tears the demo
# down, unless --keep is given (the agent then keeps running; see the printed commands).
set -eu
set -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
[ "$(id -u)" = "0" ] || { echo "demo.sh: run as root (containerd, CNI and iptables need it)" >&2; exit 2; }

DEMO=/tmp/memoh-demo
AGENT=target/release/memoh-agent
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing packages"
scripts/install-deps.sh

say "building (release)"
cargo build --release -p memoh-agent -p container-server

say "building the memohai/mcp image (OCI archive, no Docker needed)"
scripts/build-image.sh

say "starting a private containerd"
scripts/test-env.sh up
eval "$(scripts/test-env.sh env)"

rm -rf "$DEMO" && mkdir -p "$DEMO"
cat >"$DEMO/agent.toml" <<TOML
containerd_socket = "$MEMOH_TEST_CONTAINERD_SOCK"
namespace = "memoh-demo"
cni_conf_dir = "$DEMO/cni"
cni_network = "memoh-demo"
cni_bridge = "memohdemo0"
cni_subnet = "10.209.33.0/24"
cni_ipam_dir = "$DEMO/ipam"
state_dir = "$DEMO/state"
data_root = "$DEMO/data"
control_socket = "$DEMO/agent.sock"
# The server every bot runs, bound read-only from the host: the static one the image was built
# with (the busybox image has no C library for a dynamically linked one).
server_binary = "$ROOT/target/static/x86_64-unknown-linux-gnu/release/container-server"
TOML
export MEMOH_AGENT_SOCKET="$DEMO/agent.sock"

cleanup() {
    if [ "$KEEP" = "1" ]; then return; fi
    say "tearing down"
    "$AGENT" bot rm demo >/dev/null 2>&1 || true
    [ -f "$DEMO/agent.pid" ] && kill "$(cat "$DEMO/agent.pid")" 2>/dev/null || true
    sleep 0.5
    ip link del memohdemo0 2>/dev/null || true
    iptables -t nat -D POSTROUTING -s 10.209.33.0/24 ! -d 10.209.33.0/24 -m comment --comment memoh-masq -j MASQUERADE 2>/dev/null || true
    iptables -D MEMOH-ISOLATION -i memohdemo0 -o memohdemo0 -j DROP 2>/dev/null || true
    scripts/test-env.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "starting memoh-agent"
"$AGENT" serve --config "$DEMO/agent.toml" >"$DEMO/agent.log" 2>&1 &
echo $! >"$DEMO/agent.pid"
for _ in $(seq 50); do [ -S "$DEMO/agent.sock" ] && break; sleep 0.1; done

say "importing the image"
"$AGENT" image import target/image/memohai-mcp.tar
"$AGENT" image ls

say "creating the bot 'demo'"
time "$AGENT" bot create demo
"$AGENT" bot ls

say "running commands in it"
"$AGENT" exec demo -- sh -c 'echo "hello from $(hostname), pid 1 is $(cat /proc/1/comm)"; ls -la /data'
echo "a file from the host" >"$DEMO/hello.txt"
"$AGENT" cp "$DEMO/hello.txt" demo:/data/hello.txt
"$AGENT" exec demo -- cat /data/hello.txt
"$AGENT" cp demo:/data/hello.txt "$DEMO/back.txt" && cmp "$DEMO/hello.txt" "$DEMO/back.txt" && echo "copied out byte-exact"

say "a process that outlives the call: start it, list it, replay its output, stop it"
ID=$("$AGENT" exec --detach --tag counter demo -- sh -c 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done')
echo "started process $ID"
sleep 1
"$AGENT" ps demo
"$AGENT" kill demo "$ID" -s TERM
"$AGENT" wait demo "$ID" || true
{ "$AGENT" attach demo "$ID" --from-start || true; } | head -n 3

say "versions: take one live (the bot keeps running), change the data, roll back"
"$AGENT" snapshot create demo --name "first"
"$AGENT" exec demo -- sh -c 'echo changed > /data/hello.txt'
"$AGENT" snapshot rollback demo 1
"$AGENT" exec demo -- cat /data/hello.txt
"$AGENT" snapshot ls demo

say "the bot as JSON"
"$AGENT" bot inspect demo

if [ "$KEEP" = "1" ]; then
    say "the demo keeps running"
    echo "export MEMOH_AGENT_SOCKET=$DEMO/agent.sock"
    echo "$AGENT exec demo -- sh"
else
    say "demo done"
fi
