#!/usr/bin/env bash
# Runs a command against a hubbub cluster of its own on this machine: PostgreSQL (through
# bench/with-postgres.sh), a Redis on a free port, and `hubbub serve --workers N` (WORKERS,
# default 3) on 127.0.0.1:PORT (default 18090), rate limits lifted as in ab.sh. The
# command finds the server's URL in $URL and the parent's PID in $SERVER_PID (its workers
# are its children: `hubbub bench --server-pid` counts them too). Everything is stopped
# afterwards.
#
#   bench/with-cluster.sh bash -c 'target/release/hubbub bench --url $URL --server-pid $SERVER_PID \
#       idle --conns 100000 --procs 7 --source-addrs 8'
#
# Needs Debian's postgresql and redis-server packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PG_URL:-}" ]; then
    exec bench/with-postgres.sh "$0" "$@"
fi
WORKERS=${WORKERS:-3}
PORT=${PORT:-18090}
BIN=${HUBBUB:-target/release/hubbub}
DIR=$(mktemp -d)
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
    --maxclients 10000 --daemonize no >"$DIR/redis.log" 2>&1 &
REDIS=$!
SERVER=
stop() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    kill "$REDIS" 2>/dev/null || true
    wait "$REDIS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap stop EXIT
for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
mkdir -p "$DIR/data"
env HUBBUB_SEND_RATE_PER_SEC=10000000 HUBBUB_SEND_BURST=10000000 \
    HUBBUB_FRAME_RATE_PER_SEC=10000000 HUBBUB_FRAME_BURST=10000000 \
    HUBBUB_MAX_CONNECTIONS=1000000 \
    HUBBUB_MAX_CONNECTIONS_PER_IP=1000000 HUBBUB_MAX_HTTP_CONNECTIONS_PER_IP=1000000 \
    HUBBUB_LOG=warn HUBBUB_JWT_SECRET=bench-cluster-secret-of-at-least-32-bytes \
    taskset -c "${SERVER_CPU:-0}" "$BIN" serve --guest --bind "127.0.0.1:$PORT" --data-dir "$DIR/data" \
    --store "$PG_URL" --bus "redis://127.0.0.1:$REDIS_PORT" --workers "$WORKERS" >"$DIR/out" &
SERVER=$!
for _ in $(seq 600); do
    grep -q listening "$DIR/out" 2>/dev/null && break
    sleep 0.1
done
grep listening "$DIR/out" >&2
export URL="ws://127.0.0.1:$PORT" SERVER_PID=$SERVER
"$@"
