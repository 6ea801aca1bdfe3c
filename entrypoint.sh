#!/bin/sh
# Entrypoint of the memohai/mcp image, for running it without memoh-agent.
#
# Under memoh-agent this script does not run: the agent binds its own server binary read-only
# at /opt/memoh/bridge and makes it the bot's process (PID 1), so a bot can never replace its
# server (it could rewrite /app/mcp below) and a host upgrade reaches every bot at its next
# start. Should this script run with that mount present, it execs the host's binary too (an
# empty /opt/memoh/bridge is the mount point runc left in the writable layer, not a server).
#
# Without the agent: the server ships at /opt/mcp (image layer) and runs from /app/mcp, which
# lives in the container's writable layer: the copy travels with the container's snapshots, and
# an image upgrade reaches existing containers because a differing /opt/mcp replaces the copy
# on the next start. The copy is atomic (temp name in /app, then rename), so a crash half-way
# never leaves a truncated /app/mcp, and a running /app/mcp ("text file busy") is replaced
# safely. A copy that lost its execute bit is replaced too. `exec` makes the server PID 1 so it
# receives SIGTERM directly.
#
# "Differing" is decided by the checksum the image ships in /opt/mcp.sha256 (or, without it,
# the file's size and mtime), recorded next to the copy, not by comparing the bytes: every start
# (and so every snapshot and rollback) would otherwise read both binaries in full.
set -eu

HOST_BRIDGE=/opt/memoh/bridge
if [ -f "$HOST_BRIDGE" ] && [ -s "$HOST_BRIDGE" ] && [ -x "$HOST_BRIDGE" ]; then
    exec "$HOST_BRIDGE" "$@"
fi

SRC=/opt/mcp
DIR=/app
DST=$DIR/mcp
STAMP=$DIR/.mcp.stamp

if [ -f "$SRC.sha256" ]; then
    want=$(cat "$SRC.sha256")
else
    want=$(stat -c '%s %Y' "$SRC")
fi
have=$(cat "$STAMP" 2>/dev/null || true)

if [ ! -f "$DST" ] || [ ! -x "$DST" ] || [ "$want" != "$have" ]; then
    mkdir -p "$DIR"
    tmp="$DIR/.mcp.tmp.$$"
    rm -f "$tmp"
    cp "$SRC" "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$DST"
    printf '%s\n' "$want" > "$STAMP.tmp.$$"
    mv -f "$STAMP.tmp.$$" "$STAMP"
fi

exec "$DST" "$@"
