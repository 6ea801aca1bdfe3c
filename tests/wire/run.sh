#!/usr/bin/env bash
# Wire-compatibility check of container-server with an independent Python gRPC client.
# Sets up the venv target/wire-venv (grpcio, grpcio-tools, health and reflection clients, h2
# for the raw HTTP/2 client of test_aborts.py, pytest), builds target/debug/container-server
# unless WIRE_SERVER_BIN names a binary, and runs the pytest suite, which starts the server
# itself (loopback port, temp data and template dirs) and stops it afterwards. Extra arguments
# go to pytest (e.g. -k exec, -x).
set -eu
set -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV="$ROOT/target/wire-venv"
PY=${PYTHON:-python3}
[ -x /usr/bin/python3 ] && PY=${PYTHON:-/usr/bin/python3}

if [ ! -x "$VENV/bin/pytest" ] || ! "$VENV/bin/python" -c 'import grpc_tools, grpc_health, grpc_reflection, h2' 2>/dev/null; then
    echo "wire: creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        grpcio grpcio-tools grpcio-health-checking grpcio-reflection h2 pytest
fi

if [ -z "${WIRE_SERVER_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet -p container-server)
    export WIRE_SERVER_BIN="$ROOT/target/debug/container-server"
fi

cd "$HERE"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q "$@" "$HERE"
