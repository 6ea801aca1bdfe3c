#!/bin/sh
# Installs the Debian packages the build and the system tests need: containerd, runc, the CNI
# plugins, iptables and nftables (bot containment), the busybox base of the test image, skopeo
# and a registry for pull tests, Python's venv for the wire-compatibility client, and the C
# toolchain cargo links with.
# Idempotent: when every package is already installed it does nothing (set FORCE=1 to run
# apt-get anyway). Needs root (uses sudo when it is not root).
set -eu

PACKAGES="
ca-certificates
build-essential
pkg-config
file
tar
gzip
coreutils
util-linux
procps
iproute2
iptables
nftables
containerd
runc
containernetworking-plugins
busybox-static
binutils
skopeo
docker-registry
jq
protobuf-compiler
python3
python3-venv
python3-pip
"

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing="$missing $p"
done

if [ -z "$missing" ] && [ "${FORCE:-0}" != "1" ]; then
    echo "install-deps: all packages already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi

echo "install-deps: installing:${missing:- (forced)}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
echo "install-deps: done"
