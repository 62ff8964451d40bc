#!/usr/bin/env bash
# Side-by-side benchmark: hubbub (embedded SQLite, every message stored) and the
# reference broadcast hub in bench/gohub, each pinned to one core with the load
# generator pinned to the other. Prints each run's summary; the JSON lines go to
# $OUT (default target/bench-results.jsonl).
#
#   bench/compare.sh [all|idle|connect|fanout|sweep|bigroom|dm]...
#
# Environment: SERVER_CPU (default 0), BENCH_CPU (default 1), IDLE_CONNS (19000),
# FANOUT_RATES (per-sender messages/s of the 1,000-member runs, default "10 20 50"),
# BENCH_ARGS (more options for every run, e.g. --in-step), PERF_STAT (set: count the
# server's system calls with perf for 6 s from 2 s into each run; needs perf),
# SWEEP_RATES (per-sender messages/s for the 1,000-member sweep), FEATURES (cargo
# features of the hubbub build, e.g. mimalloc), HUBBUB (a hubbub binary to run instead
# of building target/release/hubbub, e.g. an older build kept for comparison).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
IDLE_CONNS=${IDLE_CONNS:-19000}
SWEEP_RATES=${SWEEP_RATES:-"10 20 50 100 200"}
FANOUT_RATES=${FANOUT_RATES:-"10 20 50"}
HUBBUB_PORT=${HUBBUB_PORT:-18080}
GOHUB_PORT=${GOHUB_PORT:-19001}
OUT=${OUT:-target/bench-results.jsonl}
PERF_EVENTS=${PERF_EVENTS:-raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait}
mkdir -p target/gohub
: >"$OUT"

if [ -z "${HUBBUB:-}" ]; then
    cargo build --release -q -p hubbub ${FEATURES:+--features "$FEATURES"}
    HUBBUB=target/release/hubbub
fi
(cd bench/gohub && GO111MODULE=off GOPATH=/usr/share/gocode go build -o ../../target/gohub/gohub .)
DATA=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$DATA"
}
trap cleanup EXIT

# hubbub with the per-connection rate limits lifted (the generator sends far faster
# than a person) and no per-address connection cap (every client is 127.0.0.x).
HUBBUB_SEND_RATE_PER_SEC=10000000 HUBBUB_SEND_BURST=10000000 \
HUBBUB_FRAME_RATE_PER_SEC=10000000 HUBBUB_FRAME_BURST=10000000 \
HUBBUB_MAX_CONNECTIONS_PER_IP=1000000 HUBBUB_MAX_HTTP_CONNECTIONS_PER_IP=1000000 HUBBUB_LOG=warn \
    taskset -c "$SERVER_CPU" "$HUBBUB" serve --guest --bind "127.0.0.1:$HUBBUB_PORT" --data-dir "$DATA" >/dev/null &
HUBBUB_PID=$!
PIDS+=("$HUBBUB_PID")
taskset -c "$SERVER_CPU" target/gohub/gohub --port "$GOHUB_PORT" 2>/dev/null &
GOHUB_PID=$!
PIDS+=("$GOHUB_PID")
sleep 1

# bench TARGET ARGS...: one run against hubbub or gohub.
bench() {
    local target=$1
    shift
    local url pid
    if [ "$target" = hubbub ]; then url=ws://127.0.0.1:$HUBBUB_PORT pid=$HUBBUB_PID; else url=ws://127.0.0.1:$GOHUB_PORT pid=$GOHUB_PID; fi
    local tflag=hubbub
    [ "$target" = gohub ] && tflag=raw
    echo "== $target: $*"
    local out perf_pid=
    if [ -n "${PERF_STAT:-}" ]; then
        (sleep 2 && perf stat -x, -p "$pid" -e "$PERF_EVENTS" -- sleep 6 2>&1 >/dev/null |
            awk -F, '{printf "  perf: %s %s\n", $3, $1}') &
        perf_pid=$!
    fi
    out=$(taskset -c "$BENCH_CPU" "$HUBBUB" bench --url "$url" --server-pid "$pid" --target "$tflag" \
        --source-addrs 4 "$@" ${BENCH_ARGS:-})
    head -n1 <<<"$out" | sed "s/^{/{\"server\":\"$target\",/" >>"$OUT"
    tail -n +2 <<<"$out"
    [ -n "$perf_pid" ] && wait "$perf_pid"
    sleep 2
}

both() {
    bench gohub "$@"
    bench hubbub "$@"
}

run() {
    case $1 in
    idle) both idle --conns "$IDLE_CONNS" --rate 4000 --hold 5 ;;
    connect) both connect --conns 10000 --concurrency 200 ;;
    fanout) for r in $FANOUT_RATES; do both fanout --members 1000 --senders 10 --rate "$r" --duration 10; done ;;
    sweep) for r in $SWEEP_RATES; do both fanout --members 1000 --senders 10 --rate "$r" --duration 10; done ;;
    bigroom) both fanout --members 10000 --senders 1 --rate 1 --duration 10 --drain 10 ;;
    dm)
        # 50 and 10 pairs: a commit's cost follows the conversations it touches.
        for p in 50 10; do bench hubbub dm --pairs "$p" --rate 0 --inflight 64 --duration 10; done
        for r in 160 250; do bench hubbub dm --pairs 50 --rate "$r" --duration 10; done
        for r in 1250 1750; do bench hubbub dm --pairs 10 --rate "$r" --duration 10; done
        ;;
    all) for s in idle connect fanout sweep bigroom dm; do run "$s"; done ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
    esac
}

[ $# -eq 0 ] && set -- all
for s in "$@"; do run "$s"; done
echo "JSON lines: $OUT"
