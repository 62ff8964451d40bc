#!/usr/bin/env bash
# Interleaved runs of one `hubbub bench` scenario against several hubbub builds, to compare
# builds on a noisy machine: round 1 runs every build once, then round 2, and so on.
#
#   bench/ab.sh ROUNDS BUILD... -- SCENARIO ARGS...
#   cp target/release/hubbub target/hubbub-before   # then rebuild with the change
#   bench/ab.sh 3 target/hubbub-before target/release/hubbub -- dm --pairs 50 --rate 0 --inflight 64 --duration 10
#
# A BUILD is a hubbub binary, optionally followed by `|` and server environment
# variables: 'target/release/hubbub|HUBBUB_WRITE_LINGER_MS=15'. Every run starts a fresh
# server (its own temporary data dir) pinned to core 0 and the generator (this
# checkout's target/release/hubbub) on core 1, with rate limits lifted as in
# compare.sh. Each run prints the generator's summary, its JSON line, and the server's
# store batch size and WebSocket frames written per stored message (and, with
# SHOW_METRICS=REGEX, the server's metric lines that match REGEX).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
PORT=${PORT:-18090}
rounds=$1
shift
builds=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    builds+=("$1")
    shift
done
[ "${1:-}" = -- ] || { echo "usage: bench/ab.sh ROUNDS BUILD... -- SCENARIO ARGS..." >&2; exit 2; }
shift

cargo build --release -q -p hubbub
GEN=target/release/hubbub
DATA=
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    [ -n "$DATA" ] && rm -rf "$DATA"
}
trap cleanup EXIT

metric() { awk -v m="$1" '$1 == m { print $2 }' <<<"$2"; }

for round in $(seq "$rounds"); do
    for build in "${builds[@]}"; do
        bin=${build%%|*}
        envs=()
        [[ "$build" == *"|"* ]] && read -r -a envs <<<"${build#*|}"
        DATA=$(mktemp -d)
        env HUBBUB_SEND_RATE_PER_SEC=10000000 HUBBUB_SEND_BURST=10000000 \
            HUBBUB_FRAME_RATE_PER_SEC=10000000 HUBBUB_FRAME_BURST=10000000 \
            HUBBUB_MAX_CONNECTIONS_PER_IP=1000000 HUBBUB_MAX_HTTP_CONNECTIONS_PER_IP=1000000 HUBBUB_LOG=warn "${envs[@]}" \
            taskset -c "$SERVER_CPU" "$bin" serve --guest --bind "127.0.0.1:$PORT" --data-dir "$DATA" >/dev/null &
        PID=$!
        sleep 1
        echo "== round $round: $build"
        taskset -c "$BENCH_CPU" "$GEN" bench --url "ws://127.0.0.1:$PORT" --server-pid "$PID" \
            --source-addrs 4 "$@"
        m=$(curl -s "http://127.0.0.1:$PORT/metrics")
        awk -v n="$(metric hubbub_store_batch_size_count "$m")" \
            -v s="$(metric hubbub_store_batch_size_sum "$m")" \
            -v f="$(metric hubbub_frames_out_total "$m")" \
            'BEGIN { if (n > 0) printf "  store: %.0f writes per batch; %.2f frames written per stored write\n", s / n, f / s }'
        # SHOW_METRICS=REGEX prints the server's metric lines that match it.
        [ -n "${SHOW_METRICS:-}" ] && grep -E "${SHOW_METRICS}" <<<"$m" | sed 's/^/  /' || true
        kill "$PID"
        wait "$PID" 2>/dev/null || true
        PID=
        rm -rf "$DATA"
        DATA=
    done
done
