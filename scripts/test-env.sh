#!/usr/bin/env bash
# The environment of the system tests: a private containerd and a loopback registry.
#
# Usage (as root): scripts/test-env.sh up|down|env|status
#   up      start both (idempotent: running services are left alone)
#   down    stop both, kill what the private containerd left running, unmount and remove
#           their state (logs stay in $LIB/logs)
#   env     print `export` lines for the tests: eval "$(scripts/test-env.sh env)"
#   status  say what runs
#
# The containerd is private: its own root, state, socket and config under /var/lib/memoh-test
# and /run/memoh-test; the system containerd (/run/containerd/containerd.sock, /var/lib/containerd)
# is never used. Containerd 1.6's shims still put their sockets in /run/containerd/s/ (a
# hard-coded path, named by a hash that includes our socket path, so they never collide), and
# runc keeps its state in /run/containerd/runc/<namespace> unless the client passes a runc root:
# tests should pass MEMOH_TEST_RUNC_ROOT (`ctr run --runc-root`, or the runc options' Root),
# and `ctr` clients MEMOH_TEST_FIFO_DIR (`--fifo-dir`; its default is /run/containerd/fifo).
#
# Overrides: MEMOH_TEST_RUN (default /run/memoh-test), MEMOH_TEST_LIB (default
# /var/lib/memoh-test), MEMOH_TEST_REGISTRY_PORT (default: a free port, kept while up).
set -eu
set -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${MEMOH_TEST_RUN:-/run/memoh-test}
LIB=${MEMOH_TEST_LIB:-/var/lib/memoh-test}
LOGS="$LIB/logs"
SOCK="$RUN/containerd.sock"
CTRD_CONFIG="$RUN/containerd.toml"
CTRD_PID="$RUN/containerd.pid"
CTRD_ROOT="$LIB/containerd"
CTRD_STATE="$RUN/containerd"
RUNC_ROOT="$RUN/runc"
FIFO_DIR="$RUN/fifo"
REG_CONFIG="$RUN/registry.yml"
REG_PID="$RUN/registry.pid"
REG_PORT_FILE="$RUN/registry.port"
REG_STORAGE="$LIB/registry"
NAMESPACE=memoh-test
IMAGE_TAR="$ROOT/target/image/memohai-mcp.tar"

die() { echo "test-env: $*" >&2; exit 1; }
log() { echo "test-env: $*" >&2; }

# alive PIDFILE EXE: the pid in PIDFILE runs EXE.
alive() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$2" ]
}

# stop PIDFILE EXE: TERM, wait up to 10 s, then KILL.
stop() {
    local pid i
    if alive "$1" "$2"; then
        pid=$(cat "$1")
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            log "$(basename "$2") ($pid) ignored SIGTERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$1"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

CONTAINERD=$(command -v containerd || true)
REGISTRY=$(command -v docker-registry || true)

write_containerd_config() {
    cat >"$CTRD_CONFIG" <<EOF
# Private containerd of the memoh system tests (scripts/test-env.sh).
version = 2
root = "$CTRD_ROOT"
state = "$CTRD_STATE"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$LIB/opt"
EOF
}

start_containerd() {
    [ -n "$CONTAINERD" ] || die "containerd not found (run scripts/install-deps.sh)"
    command -v runc >/dev/null || die "runc not found (run scripts/install-deps.sh)"
    if alive "$CTRD_PID" "$CONTAINERD"; then
        log "containerd already running (pid $(cat "$CTRD_PID"))"
    else
        write_containerd_config
        rm -f "$SOCK" "$SOCK.ttrpc"
        setsid "$CONTAINERD" --config "$CTRD_CONFIG" --root "$CTRD_ROOT" --state "$CTRD_STATE" \
            --address "$SOCK" >>"$LOGS/containerd.log" 2>&1 </dev/null &
        echo $! >"$CTRD_PID"
        log "containerd started (pid $!), log $LOGS/containerd.log"
    fi
    local i
    for i in $(seq 1 150); do
        if ctr -a "$SOCK" version >/dev/null 2>&1; then
            return 0
        fi
        alive "$CTRD_PID" "$CONTAINERD" || { tail -n 20 "$LOGS/containerd.log" >&2; die "containerd exited"; }
        sleep 0.2
    done
    tail -n 20 "$LOGS/containerd.log" >&2
    die "containerd did not answer on $SOCK within 30 s"
}

start_registry() {
    [ -n "$REGISTRY" ] || die "docker-registry not found (run scripts/install-deps.sh)"
    local port
    if alive "$REG_PID" "$REGISTRY"; then
        port=$(cat "$REG_PORT_FILE")
        log "registry already running (pid $(cat "$REG_PID")) on 127.0.0.1:$port"
    else
        port=${MEMOH_TEST_REGISTRY_PORT:-$(free_port)}
        echo "$port" >"$REG_PORT_FILE"
        mkdir -p "$REG_STORAGE"
        cat >"$REG_CONFIG" <<EOF
# Loopback registry of the memoh system tests (scripts/test-env.sh).
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $REG_STORAGE
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$port
health:
  storagedriver:
    enabled: false
EOF
        setsid "$REGISTRY" serve "$REG_CONFIG" >>"$LOGS/registry.log" 2>&1 </dev/null &
        echo $! >"$REG_PID"
        log "registry started (pid $!) on 127.0.0.1:$port, log $LOGS/registry.log"
    fi
    local i
    for i in $(seq 1 100); do
        if python3 - "$port" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen("http://127.0.0.1:%s/v2/" % sys.argv[1], timeout=1).read()
PY
        then
            return 0
        fi
        alive "$REG_PID" "$REGISTRY" || { tail -n 20 "$LOGS/registry.log" >&2; die "registry exited"; }
        sleep 0.2
    done
    tail -n 20 "$LOGS/registry.log" >&2
    die "registry did not answer on 127.0.0.1:$port within 20 s"
}

# Kill every task and delete every container of the private containerd, so no shim outlives it.
drain_containerd() {
    local ns id
    ctr -a "$SOCK" version >/dev/null 2>&1 || return 0
    for ns in $(ctr -a "$SOCK" namespaces ls -q 2>/dev/null); do
        for id in $(ctr -a "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
            ctr -a "$SOCK" -n "$ns" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr -a "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
            ctr -a "$SOCK" -n "$ns" tasks delete -f "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr -a "$SOCK" -n "$ns" containers ls -q 2>/dev/null); do
            ctr -a "$SOCK" -n "$ns" containers delete "$id" >/dev/null 2>&1 || true
        done
    done
}

# Shims of our containerd that are still alive (their command line names our socket).
kill_leftover_shims() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)
        case "$cmd" in
            *containerd-shim*"-address $SOCK "*)
                log "killing leftover shim ${p#/proc/}"
                kill -KILL "${p#/proc/}" 2>/dev/null || true ;;
        esac
    done
}

# Unmount everything mounted under our directories, deepest first.
unmount_under() {
    local dir m
    for dir in "$@"; do
        [ -d "$dir" ] || continue
        awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
            sort -r | while read -r m; do
                umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
            done
    done
}

cmd_up() {
    [ "$(id -u)" = "0" ] || die "must run as root"
    mkdir -p "$RUN" "$LIB" "$LOGS" "$RUNC_ROOT" "$FIFO_DIR"
    chmod 0711 "$RUN" "$LIB"
    start_containerd
    start_registry
    log "up: containerd $SOCK, registry 127.0.0.1:$(cat "$REG_PORT_FILE")"
}

cmd_down() {
    [ "$(id -u)" = "0" ] || die "must run as root"
    if [ -n "$CONTAINERD" ] && alive "$CTRD_PID" "$CONTAINERD"; then
        drain_containerd
    fi
    stop "$CTRD_PID" "${CONTAINERD:-/usr/bin/containerd}"
    kill_leftover_shims
    stop "$REG_PID" "${REGISTRY:-/usr/bin/docker-registry}"
    unmount_under "$LIB" "$RUN"
    rm -rf "$CTRD_ROOT" "$CTRD_STATE" "$RUNC_ROOT" "$FIFO_DIR" "$REG_STORAGE" "$LIB/opt" \
        "$CTRD_CONFIG" "$REG_CONFIG" "$REG_PORT_FILE" "$SOCK" "$SOCK.ttrpc"
    rmdir "$RUN" 2>/dev/null || true
    # Our shims made /run/containerd/s (containerd 1.6 hard-codes it). Remove it only when it
    # is empty and no system containerd lives there.
    if [ ! -e /run/containerd/containerd.sock ]; then
        rmdir /run/containerd/s 2>/dev/null && rmdir /run/containerd 2>/dev/null || true
    fi
    log "down"
}

cmd_env() {
    local port=""
    [ -f "$REG_PORT_FILE" ] && port=$(cat "$REG_PORT_FILE")
    echo "export MEMOH_TEST_CONTAINERD_SOCK=$SOCK"
    echo "export MEMOH_TEST_NAMESPACE=$NAMESPACE"
    echo "export MEMOH_TEST_RUNC_ROOT=$RUNC_ROOT"
    echo "export MEMOH_TEST_FIFO_DIR=$FIFO_DIR"
    echo "export MEMOH_TEST_REGISTRY=127.0.0.1:${port:-UNSET}"
    echo "export MEMOH_TEST_IMAGE_TAR=$IMAGE_TAR"
    [ -n "$port" ] || log "registry is not up (run: $0 up)"
}

cmd_status() {
    if [ -n "$CONTAINERD" ] && alive "$CTRD_PID" "$CONTAINERD"; then
        echo "containerd: running (pid $(cat "$CTRD_PID")) on $SOCK"
    else
        echo "containerd: stopped"
    fi
    if [ -n "$REGISTRY" ] && alive "$REG_PID" "$REGISTRY"; then
        echo "registry: running (pid $(cat "$REG_PID")) on 127.0.0.1:$(cat "$REG_PORT_FILE")"
    else
        echo "registry: stopped"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
