#!/bin/sh
# Entrypoint of the memohai/mcp image.
#
# The server ships at /opt/mcp (image layer). It runs from /app/mcp, which lives in the
# container's writable layer: the copy travels with the container's snapshots, and an image
# upgrade reaches existing containers because a differing /opt/mcp replaces the copy on the
# next start. The copy is atomic (temp name in /app, then rename), so a crash half-way never
# leaves a truncated /app/mcp, and a running /app/mcp ("text file busy") is replaced safely.
# A copy that lost its execute bit is replaced too. `exec` makes the server PID 1 so it
# receives SIGTERM directly.
#
# "Differing" is decided by the checksum the image ships in /opt/mcp.sha256 (or, without it,
# the file's size and mtime), recorded next to the copy, not by comparing the bytes: every start
# (and so every snapshot and rollback) would otherwise read both binaries in full.
set -eu

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
