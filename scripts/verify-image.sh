#!/usr/bin/env bash
# End-to-end check of the test image against the private containerd and registry of
# scripts/test-env.sh (run `scripts/test-env.sh up` first; needs root):
#   1. `ctr images import` of the archive,
#   2. `ctr run` of the image in a network namespace created here (veth pair on
#      10.254.254.0/30: host .1, container .2), port 9090 answers from the host; with the
#      wire venv (tests/wire/run.sh creates it) a real gRPC round trip: health, reflection,
#      Stat, ListDir, WriteFile/ReadFile, Exec,
#   3. the entrypoint copied /opt/mcp to /app/mcp,
#   4. `skopeo copy` of the archive into the registry, and `ctr images pull --plain-http` back.
# Everything created here (task, container, images, netns, veth) is removed on exit, on
# failure too.
#
# Usage: scripts/verify-image.sh [IMAGE_TAR]   (default: $MEMOH_TEST_IMAGE_TAR)
set -eu
set -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
eval "$("$ROOT/scripts/test-env.sh" env 2>/dev/null)"
TAR=${1:-$MEMOH_TEST_IMAGE_TAR}
SOCK=$MEMOH_TEST_CONTAINERD_SOCK
NS=$MEMOH_TEST_NAMESPACE
REG=$MEMOH_TEST_REGISTRY
IMAGE=docker.io/memohai/mcp:latest
PULLED="$REG/memohai/mcp:verify"
CID="mcp-verify-$$"
NETNS="memoh-verify-$$"
VETH_HOST="mvh$$"
HOST_IP=10.254.254.1
CT_IP=10.254.254.2
VENV_PY="$ROOT/target/wire-venv/bin/python"

say() { echo "verify-image: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
c() { ctr -a "$SOCK" -n "$NS" "$@"; }

[ "$(id -u)" = "0" ] || die "must run as root"
[ -f "$TAR" ] || die "image archive not found: $TAR (scripts/build-image.sh)"
ctr -a "$SOCK" version >/dev/null 2>&1 || die "private containerd not up (scripts/test-env.sh up)"

cleanup() {
    set +e
    c tasks kill -s SIGKILL "$CID" >/dev/null 2>&1
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        c tasks ls -q 2>/dev/null | grep -qx "$CID" || break
        c tasks delete -f "$CID" >/dev/null 2>&1 && break
        sleep 0.3
    done
    c containers delete "$CID" >/dev/null 2>&1
    c images rm "$IMAGE" "$PULLED" >/dev/null 2>&1
    ip link del "$VETH_HOST" >/dev/null 2>&1
    ip netns del "$NETNS" >/dev/null 2>&1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. import
say "importing $TAR into $NS"
c images import "$TAR" >&2
c images ls -q | grep -qx "$IMAGE" || die "$IMAGE not listed after import"
c images check 2>/dev/null | grep -F "$IMAGE" >&2

# 2. network namespace and run
ip netns add "$NETNS"
ip link add "$VETH_HOST" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
ip -n "$NETNS" addr add "$CT_IP/30" dev eth0
ip -n "$NETNS" link set eth0 up
ip -n "$NETNS" link set lo up

say "running $CID in netns $NETNS ($CT_IP)"
c run -d --runc-root "$MEMOH_TEST_RUNC_ROOT" --fifo-dir "$MEMOH_TEST_FIFO_DIR" --with-ns "network:/var/run/netns/$NETNS" "$IMAGE" "$CID" >&2

port_open() {
    python3 - "$CT_IP" <<'PY'
import socket, sys
s = socket.create_connection((sys.argv[1], 9090), timeout=1)
s.close()
PY
}
ok=""
for _ in $(seq 1 50); do
    if port_open 2>/dev/null; then ok=1; break; fi
    c tasks ls | grep -F "$CID" | grep -q RUNNING || { c tasks ls >&2; die "task is not running"; }
    sleep 0.2
done
[ -n "$ok" ] || die "nothing listens on $CT_IP:9090"
say "port 9090 of the container answers from the host"

# 3. entrypoint copy and image contents
c tasks exec --fifo-dir "$MEMOH_TEST_FIFO_DIR" --exec-id "check-$$" "$CID" sh -c \
    'cmp /opt/mcp /app/mcp && ls -l /app/mcp /entrypoint.sh && ls -la /data && cat /proc/1/cmdline | tr "\0" " " && echo && pwd' >&2 \
    || die "entrypoint did not copy /opt/mcp to /app/mcp"

# gRPC round trip, when the client venv exists.
if [ -x "$VENV_PY" ]; then
    say "gRPC round trip against $CT_IP:9090"
    "$VENV_PY" - "$CT_IP:9090" "$ROOT/tests/wire" <<'PY'
import os, sys, tempfile
from grpc_tools import protoc
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

target, protodir = sys.argv[1:]
out = tempfile.mkdtemp()
assert protoc.main(["protoc", "-I" + protodir, "--python_out=" + out, "--grpc_python_out=" + out,
                    os.path.join(protodir, "mcpcontainer.proto")]) == 0
sys.path.insert(0, out)
import mcpcontainer_pb2 as pb, mcpcontainer_pb2_grpc as pbg

ch = grpc.insecure_channel(target)
grpc.channel_ready_future(ch).result(timeout=10)
h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(h.status))
for pkg in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
    call = ch.stream_stream("/%s.ServerReflection/ServerReflectionInfo" % pkg,
                            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    try:
        resp = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
        print("reflection (%s):" % pkg, sorted(s.name for s in resp.list_services_response.service))
    except grpc.RpcError as e:
        print("reflection (%s): %s" % (pkg, e.code()))
s = pbg.ContainerServiceStub(ch)
e = s.Stat(pb.StatRequest(path="."), timeout=5).entry
print("stat .:", e.path, e.is_dir, e.mode)
print("listdir /data:", [x.path for x in s.ListDir(pb.ListDirRequest(path=""), timeout=5).entries])
s.WriteFile(pb.WriteFileRequest(path="hello.txt", content=b"hi from the host\n"), timeout=5)
print("readfile:", repr(s.ReadFile(pb.ReadFileRequest(path="/data/hello.txt"), timeout=5).content))
msgs = list(s.Exec(iter([pb.ExecInput(command="id -u; pwd; cat /data/hello.txt; uname -s")]), timeout=10))
print("exec stdout:", repr(b"".join(m.data for m in msgs if m.stream == 0)), "exit:", msgs[-1].exit_code)
PY
else
    say "no $VENV_PY (tests/wire/run.sh creates it): skipped the gRPC round trip"
fi

# 4. registry round trip
say "skopeo copy to docker://$REG/memohai/mcp:test"
skopeo copy -q --dest-tls-verify=false "oci-archive:$TAR" "docker://$REG/memohai/mcp:test" >&2
skopeo inspect --tls-verify=false "docker://$REG/memohai/mcp:test" | jq -c '{Digest, Layers}' >&2
say "ctr pull --plain-http $REG/memohai/mcp:test"
c images pull --plain-http "$REG/memohai/mcp:test" >/dev/null
c images tag "$REG/memohai/mcp:test" "$PULLED" >/dev/null
c images rm "$REG/memohai/mcp:test" >/dev/null
c images ls | grep -F "$PULLED" >&2
say "OK"
