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
set -eu

SRC=/opt/mcp
DIR=/app
DST=$DIR/mcp

if [ ! -f "$DST" ] || [ ! -x "$DST" ] || ! cmp -s "$SRC" "$DST"; then
    mkdir -p "$DIR"
    tmp="$DIR/.mcp.tmp.$$"
    rm -f "$tmp"
    cp "$SRC" "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$DST"
fi

exec "$DST" "$@"
