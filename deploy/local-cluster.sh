#!/usr/bin/env bash
# A hubbub cluster on this machine, to try one: PostgreSQL, Redis, NODES hubbub nodes
# (default 3) and nginx in front of them (deploy/nginx.conf with these nodes), all on
# loopback, all in one temp dir. Prints the URL to open; Ctrl-C stops and removes all.
#
#   deploy/local-cluster.sh        # or: deploy/local-cluster.sh 5
#
# Needs Debian's postgresql, redis-server and nginx packages (apt-get install postgresql
# redis-server nginx). Guests may join (?user=NAME), as in the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-3}
BIN=${HUBBUB:-target/release/hubbub}
[ -x "$BIN" ] || cargo build --release -p hubbub
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$PGBIN/initdb" ] || { echo "local-cluster.sh: install postgresql first" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "local-cluster.sh: install redis-server first" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "local-cluster.sh: install nginx first" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

DIR=$(mktemp -d)
PIDS=()
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$DIR"
    chmod 755 "$DIR"
    as_pg=(runuser -u postgres --)
fi
stop() {
    trap - EXIT INT TERM
    echo "local-cluster.sh: stopping" >&2
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap stop EXIT INT TERM

PG_PORT=$(free_port)
"${as_pg[@]}" "$PGBIN/initdb" -D "$DIR/pg" -A trust -U postgres >/dev/null
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg.log" -w \
    -o "-p $PG_PORT -k $DIR -c listen_addresses=127.0.0.1" start >/dev/null
"${as_pg[@]}" "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc 'CREATE DATABASE hubbub' postgres
STORE="postgres://postgres@127.0.0.1:$PG_PORT/hubbub?sslmode=disable"

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
    >"$DIR/redis.log" 2>&1 &
PIDS+=($!)

WEB_PORT=${PORT:-$(free_port)}
mkdir -p "$DIR/data"
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
UPSTREAM=""
for i in $(seq "$NODES"); do
    port=$(free_port)
    HUBBUB_JWT_SECRET=$SECRET HUBBUB_TRUSTED_PROXIES=127.0.0.1 HUBBUB_LOG=${HUBBUB_LOG:-warn} \
        "$BIN" serve --guest --bind "127.0.0.1:$port" --data-dir "$DIR/data" \
        --store "$STORE" --bus "redis://127.0.0.1:$REDIS_PORT" >"$DIR/node$i.out" &
    PIDS+=($!)
    UPSTREAM+="        server 127.0.0.1:$port max_fails=3 fail_timeout=10s;\n"
done
for i in $(seq "$NODES"); do
    for _ in $(seq 300); do
        grep -q listening "$DIR/node$i.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q listening "$DIR/node$i.out" || { echo "local-cluster.sh: node $i did not start" >&2; exit 1; }
done

# deploy/nginx.conf with these nodes, this port, and every file in the temp dir.
awk -v dir="$DIR" -v port="$WEB_PORT" -v upstream="$UPSTREAM" '
    BEGIN { print "daemon off;"; print "pid " dir "/nginx.pid;"; print "error_log " dir "/nginx-error.log warn;" }
    /^[ \t]*#/ || /^[ \t]*$/ { print; next }
    /^(user|pid|error_log|worker_processes|worker_rlimit_nofile)[ \t]/ { next }
    /^http[ \t]*\{/ { print; for (t = split("client_body proxy fastcgi uwsgi scgi", k, " "); t > 0; t--) print "    " k[t] "_temp_path " dir "/" k[t] "_temp;"; next }
    /^[ \t]*access_log[ \t]/ { print "    access_log " dir "/nginx-access.log;"; next }
    /^[ \t]*upstream[ \t]/ { print; inup = 1; done = 0; next }
    inup && /^[ \t]*server[ \t]/ { if (!done) { printf "%s", upstream; done = 1 } next }
    inup && /^[ \t]*\}/ { inup = 0 }
    /^[ \t]*listen[ \t]/ { if (!listened) { print "        listen 127.0.0.1:" port ";"; listened = 1 } next }
    { print }
' deploy/nginx.conf | sed 's/\\n/\n/g' >"$DIR/nginx.conf"
"$NGINX" -c "$DIR/nginx.conf" -p "$DIR" 2>>"$DIR/nginx-error.log" &
PIDS+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$WEB_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$WEB_PORT/readyz" >/dev/null || { echo "local-cluster.sh: nginx did not start; see $DIR/nginx-error.log" >&2; cat "$DIR/nginx-error.log" >&2; exit 1; }
echo "local-cluster.sh: $NODES nodes on PostgreSQL and Redis behind nginx"
echo "open http://127.0.0.1:$WEB_PORT/  (Ctrl-C stops everything)"
wait "${PIDS[0]}"
