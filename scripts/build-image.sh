#!/usr/bin/env bash
# Builds the test image of the bot container, docker.io/memohai/mcp:latest, as an OCI layout
# archive without any daemon: one layer with Debian's busybox-static as the base, the
# container-server binary at /opt/mcp, /entrypoint.sh, the bot workspace template at
# /opt/mcp-template, and empty /data, /app and /tmp. The result imports with
# `ctr images import` and copies to a registry with `skopeo copy oci-archive:FILE docker://...`.
#
# Usage: scripts/build-image.sh [--out FILE] [--tag REF] [--binary PATH] [--extra SRC:DEST]...
#   --out FILE      archive to write (default target/image/memohai-mcp.tar)
#   --tag REF       image reference (default docker.io/memohai/mcp:latest; short forms are
#                   normalised as containerd does: `mcp` -> docker.io/library/mcp:latest)
#   --binary PATH   use this container-server instead of building one. A dynamically linked
#                   binary works too: its shared libraries and loader are copied into the image.
#   --extra SRC:DEST  put a file or the contents of a directory SRC at the absolute path DEST
#                   in the image (repeatable), e.g. --extra target/debug/fixture:/usr/local/bin/
#                   (a DEST ending in `/` keeps the file's name).
#   --no-fixture    leave out the test fixtures (by default the workspace's `mcp-fixture`, a
#                   small stdio MCP server, and `syscall-probe`, which makes the system calls a
#                   hostile bot would try, are built static (debug, target/static) and installed
#                   in /usr/local/bin for the MCP and hostile-bot system tests)
# Everything under image/extra/ (if present) is copied into the image at the same path,
# e.g. image/extra/usr/local/bin/tool -> /usr/local/bin/tool.
#
# Without --binary the server is built in release as a static glibc binary (the base image has
# no libc) into its own target dir, target/static, so the normal builds are not invalidated.
# Timestamps are fixed (SOURCE_DATE_EPOCH, default: the last commit's time), so the same
# inputs give the same digests.
set -eu
set -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/target/image/memohai-mcp.tar"
REF="docker.io/memohai/mcp:latest"
BINARY=""
EXTRAS=()
FIXTURE=1

die() { echo "build-image: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a value"; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; REF=$2; shift 2 ;;
        --tag=*) REF=${1#--tag=}; shift ;;
        --binary) [ $# -ge 2 ] || die "--binary needs a value"; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#--binary=}; shift ;;
        --extra) [ $# -ge 2 ] || die "--extra needs a value"; EXTRAS+=("$2"); shift 2 ;;
        --extra=*) EXTRAS+=("${1#--extra=}"); shift ;;
        --no-fixture) FIXTURE=0; shift ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

for tool in tar gzip sha256sum python3 file; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (install busybox-static, not busybox)"

# Normalise the reference the way containerd and the agent do.
name=${REF%%@*}
case "$name" in
    */*) first=${name%%/*}
         case "$first" in
             *.*|*:*|localhost) ;;
             *) name="docker.io/$name" ;;
         esac ;;
    *) name="docker.io/library/$name" ;;
esac
last=${name##*/}
case "$last" in
    *:*) TAG=${last##*:} ;;
    *) TAG=latest; name="$name:latest" ;;
esac
REF=$name

case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH

# --- the server binary --------------------------------------------------------------------
if [ -z "$BINARY" ]; then
    echo "build-image: building a static container-server (release, target/static)" >&2
    (cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        CARGO_TARGET_DIR="$ROOT/target/static" \
        cargo build --quiet --release --target x86_64-unknown-linux-gnu -p container-server)
    BINARY="$ROOT/target/static/x86_64-unknown-linux-gnu/release/container-server"
fi
# --- the MCP test fixture (static: the base image has no libc) -----------------------------
FIXTURE_BIN=""
PROBE_BIN=""
if [ "$FIXTURE" = "1" ]; then
    echo "build-image: building a static mcp-fixture and syscall-probe (debug, target/static)" >&2
    (cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        CARGO_TARGET_DIR="$ROOT/target/static" \
        cargo build --quiet --target x86_64-unknown-linux-gnu -p mcp-fixture -p syscall-probe)
    FIXTURE_BIN="$ROOT/target/static/x86_64-unknown-linux-gnu/debug/mcp-fixture"
    PROBE_BIN="$ROOT/target/static/x86_64-unknown-linux-gnu/debug/syscall-probe"
    [ -x "$FIXTURE_BIN" ] || die "mcp-fixture was not built: $FIXTURE_BIN"
    [ -x "$PROBE_BIN" ] || die "syscall-probe was not built: $PROBE_BIN"
fi
[ -f "$BINARY" ] || die "binary not found: $BINARY"
[ -x "$BINARY" ] || die "binary is not executable: $BINARY"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RFS="$WORK/rootfs"
mkdir -p "$RFS"

# --- the root filesystem ------------------------------------------------------------------
install -d -m 0755 "$RFS/bin" "$RFS/sbin" "$RFS/usr/bin" "$RFS/usr/sbin" \
    "$RFS/usr/local/bin" "$RFS/usr/local/sbin" "$RFS/etc" "$RFS/opt" "$RFS/opt/mcp-template" \
    "$RFS/data" "$RFS/app" "$RFS/root" "$RFS/proc" "$RFS/sys" "$RFS/dev" "$RFS/run" \
    "$RFS/var"
install -d -m 1777 "$RFS/tmp" "$RFS/var/tmp"

install -m 0755 "$BUSYBOX" "$RFS/bin/busybox"
# One symlink per applet at the path busybox itself names (bin/sh, usr/bin/wget, ...).
"$BUSYBOX" --list-full | while read -r applet; do
    [ -n "$applet" ] || continue
    [ "$applet" = "bin/busybox" ] && continue
    [ -e "$RFS/$applet" ] || [ -L "$RFS/$applet" ] && continue
    install -d -m 0755 "$RFS/$(dirname "$applet")"
    ln -s /bin/busybox "$RFS/$applet"
done
[ -L "$RFS/bin/sh" ] || die "busybox has no sh applet"

install -m 0755 "$BINARY" "$RFS/opt/mcp"
# The entrypoint compares this with the copy's stamp instead of reading both binaries.
sha256sum "$RFS/opt/mcp" | cut -d' ' -f1 > "$RFS/opt/mcp.sha256"
# A dynamically linked server needs its libraries and loader in this libc-less image.
if ldd_out=$(ldd "$BINARY" 2>/dev/null) && ! grep -qE 'statically linked|not a dynamic' <<<"$ldd_out"; then
    echo "build-image: $BINARY is dynamically linked; copying its libraries" >&2
    grep -oE '(=> )?/[^ ]+' <<<"$ldd_out" | sed 's/^=> //' | sort -u | while read -r lib; do
        install -d -m 0755 "$RFS/$(dirname "$lib")"
        cp -L "$lib" "$RFS/$lib"
        chmod 0755 "$RFS/$lib"
    done
fi

install -m 0755 "$ROOT/entrypoint.sh" "$RFS/entrypoint.sh"
[ -z "$FIXTURE_BIN" ] || install -m 0755 "$FIXTURE_BIN" "$RFS/usr/local/bin/mcp-fixture"
[ -z "$PROBE_BIN" ] || install -m 0755 "$PROBE_BIN" "$RFS/usr/local/bin/syscall-probe"

if [ -d "$ROOT/image/template" ]; then
    cp -R "$ROOT/image/template/." "$RFS/opt/mcp-template/"
fi

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$RFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$RFS/etc/group"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$RFS/etc/hosts"
printf 'hosts: files dns\n' >"$RFS/etc/nsswitch.conf"

# Test fixtures and other additions: image/extra/ mirrors into /, then each --extra.
if [ -d "$ROOT/image/extra" ]; then
    cp -R "$ROOT/image/extra/." "$RFS/"
fi
for spec in "${EXTRAS[@]+"${EXTRAS[@]}"}"; do
    src=${spec%:*}
    dest=${spec##*:}
    [ "$src" != "$spec" ] || die "--extra wants SRC:DEST, got $spec"
    case "$dest" in /*) ;; *) die "--extra destination must be absolute: $dest" ;; esac
    [ -e "$src" ] || die "--extra source not found: $src"
    if [ -d "$src" ]; then
        install -d -m 0755 "$RFS$dest"
        cp -R "$src/." "$RFS$dest/"
    else
        case "$dest" in */) dest="$dest$(basename "$src")" ;; esac
        install -d -m 0755 "$RFS$(dirname "$dest")"
        cp -L "$src" "$RFS$dest"
    fi
done

# --- the layer ----------------------------------------------------------------------------
BLOBS="$WORK/layout/blobs/sha256"
mkdir -p "$BLOBS"
TAR_OPTS=(--sort=name --format=gnu --numeric-owner --owner=0 --group=0
          --mtime="@$SOURCE_DATE_EPOCH")
(cd "$RFS" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort |
    tar "${TAR_OPTS[@]}" -cf "$WORK/layer.tar" -T -)
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"
LAYER_DIGEST=$(sha256sum "$WORK/layer.tar.gz" | cut -d' ' -f1)
LAYER_SIZE=$(stat -c %s "$WORK/layer.tar.gz")
mv "$WORK/layer.tar.gz" "$BLOBS/$LAYER_DIGEST"

# --- config, manifest, index --------------------------------------------------------------
python3 - "$WORK/layout" "$REF" "$TAG" "$DIFF_ID" "$LAYER_DIGEST" "$LAYER_SIZE" "$SOURCE_DATE_EPOCH" <<'PY'
import hashlib, json, os, sys, datetime

layout, ref, tag, diff_id, layer_digest, layer_size, epoch = sys.argv[1:]
blobs = os.path.join(layout, "blobs", "sha256")
created = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

def put(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)

config = {
    "created": created,
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": ["/entrypoint.sh"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/data",
        "ExposedPorts": {"9090/tcp": {}},
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
    "history": [{"created": created, "created_by": "scripts/build-image.sh"}],
}
config_digest, config_size = put(config)

manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": config_digest,
        "size": config_size,
    },
    "layers": [{
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:" + layer_digest,
        "size": int(layer_size),
    }],
}
manifest_digest, manifest_size = put(manifest)

index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": tag,
        },
    }],
}
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump(index, f, separators=(",", ":"), sort_keys=True)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
print("manifest", manifest_digest, file=sys.stderr)
PY

mkdir -p "$(dirname "$OUT")"
(cd "$WORK/layout" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    tar "${TAR_OPTS[@]}" --no-recursion -cf "$WORK/out.tar" -T -)
mv "$WORK/out.tar" "$OUT"
echo "build-image: wrote $OUT ($REF, layer diff_id sha256:$DIFF_ID)" >&2
