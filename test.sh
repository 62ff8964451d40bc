#!/usr/bin/env bash
# The test command: prepares what the tests need on this machine, then runs every test.
#
#   ./test.sh                                    # everything: cargo test --workspace --locked,
#                                                # then the chat stories on PostgreSQL
#   ./test.sh -p hubbub-server --test browser    # extra arguments go to cargo test
#
# As root on Debian/Ubuntu it installs the missing system packages with apt-get; as
# another user it prints what to install and exits 1. Then it runs the prepare steps
# (e.g. `npm ci` in tests/browser when its packages are missing or stale).
set -euo pipefail
cd "$(dirname "$0")"

# System packages the tests use: one line each, "Debian package|check that it is there".
PACKAGES=(
    "chromium|test -x /usr/bin/chromium"                 # browser test
    "nodejs|command -v node"                             # browser test (playwright-core)
    "npm|command -v npm"                                 # browser test: npm ci
    "tmux|command -v tmux"                               # terminal-client test
    "golang-go|command -v go"                            # bench smoke test: reference hub
    "golang-github-gorilla-websocket-dev|test -d /usr/share/gocode/src/github.com/gorilla/websocket"
    "postgresql|ls /usr/lib/postgresql/*/bin/initdb"     # hubbub-testkit: PgServer
    "redis-server|command -v redis-server"               # hubbub-testkit: RedisServer
    "nginx|test -x /usr/sbin/nginx"                      # hubbub-testkit: NginxServer
)

# Steps that prepare the tests once the packages are there: one function each, below.
PREPARE=(
    browser_packages
    autobahn_testsuite
)

# tests/browser's locked npm packages, installed again when package-lock.json changed.
browser_packages() {
    local dir=tests/browser stamp=tests/browser/node_modules/.locked-by
    local want
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "test.sh: npm ci in $dir" >&2
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        echo "$want" >"$stamp"
    fi
}

# The Autobahn WebSocket testsuite (wstest, Python 2.7) in a virtualenv under the target
# dir, where crates/server/tests/autobahn.rs looks for it (HUBBUB_WSTEST overrides).
autobahn_testsuite() {
    tests/autobahn/setup.sh "${CARGO_TARGET_DIR:-target}/autobahn-venv" >/dev/null
}

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is missing: install a stable Rust toolchain (rustup)" >&2
    exit 1
fi

missing=()
for entry in "${PACKAGES[@]}"; do
    if ! sh -c "${entry#*|}" >/dev/null 2>&1; then
        missing+=("${entry%%|*}")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: the tests need these Debian packages, missing here: ${missing[*]}" >&2
        echo "test.sh: install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

for step in "${PREPARE[@]}"; do
    "$step"
done

# The whole workspace, unless the arguments pick packages.
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in -p | -p* | --package | --package=*) scope=() ;; esac
done
if [ $# -gt 0 ]; then
    exec cargo test "${scope[@]}" --locked "$@"
fi
cargo test --workspace --locked
# The chat stories once more, each server storing into a PostgreSQL database of its own
# (the store conformance suite runs on both stores in the run above).
echo "test.sh: the chat stories on PostgreSQL" >&2
HUBBUB_TEST_STORE=postgres cargo test --workspace --locked \
    --test chat --test lifecycle --test limits --test http_api --test membership --test client_session \
    --test protocol_1_1
