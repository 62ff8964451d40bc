#!/usr/bin/env bash
# Runs a command with a PostgreSQL server of its own: a fresh cluster in a temp dir on a
# free port, pinned to the server core (SERVER_CPU, default 0) like the hubbub under test,
# with a database `bench`. The command finds its URL in $PG_URL; the server is stopped and
# removed afterwards.
#
#   bench/with-postgres.sh bash -c 'bench/ab.sh 3 target/release/hubbub \
#       "target/release/hubbub|HUBBUB_STORE=$PG_URL" -- dm --pairs 50 --rate 0 --inflight 64 --duration 10'
#
# (SQLite and PostgreSQL side by side, interleaved.) Needs Debian's postgresql package;
# as root, the server runs as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPU=${SERVER_CPU:-0}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$BIN/initdb" ] || { echo "with-postgres.sh: install postgresql first" >&2; exit 1; }
PORT=${PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d)
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$DIR"
    as_pg=(runuser -u postgres --)
fi
stop() {
    "${as_pg[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap stop EXIT
"${as_pg[@]}" "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
# Durable commits (fsync, synchronous_commit) as in production; room for the pools.
"${as_pg[@]}" taskset -c "$SERVER_CPU" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB -c min_wal_size=2GB -c max_wal_size=4GB ${PG_EXTRA:-}" \
    start >/dev/null
"${as_pg[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qc 'CREATE DATABASE bench' postgres
# A database that has been running reuses its old WAL files; a fresh cluster creates and
# zero-fills a new 16 MB file each time one fills up (every few seconds under these
# loads), and the commit that needs it waits. Write and recycle 1.5 GB of WAL first.
"${as_pg[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -q postgres <<'SQL' >/dev/null
CREATE TABLE warm AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 1200000);
DROP TABLE warm;
CHECKPOINT;
SELECT pg_switch_wal();
CHECKPOINT;
SQL
export PG_URL="postgres://postgres@127.0.0.1:$PORT/bench?sslmode=disable"
echo "with-postgres.sh: PostgreSQL on $PG_URL (core $SERVER_CPU)" >&2
"$@"
