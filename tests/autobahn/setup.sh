#!/usr/bin/env bash
# Installs the Autobahn WebSocket testsuite (wstest) into a Python 2.7 virtualenv in the
# directory given as the only argument, and prints the path of its wstest.
#
#   tests/autobahn/setup.sh target/autobahn-venv
#
# Idempotent: when that directory already holds a working wstest, it only prints the
# path. Python 2.7 is taken from $PYTHON27, else pyenv's 2.7.18, else `python2.7` on
# PATH. autobahntestsuite runs on Python 2.7 only; virtualenv 20.22 and later cannot
# create 2.7 environments. Both versions are pinned.
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 <install-dir>" >&2
    exit 2
fi
dir=$1
wstest="$dir/bin/wstest"
installed() { [ -x "$wstest" ] && "$dir/bin/python" -c 'import autobahntestsuite' 2>/dev/null; }

if installed; then
    echo "$(cd "$dir" && pwd)/bin/wstest"
    exit 0
fi

is_py27() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; }
candidates=("${PYTHON27:-}")
if command -v pyenv >/dev/null; then
    candidates+=("$(pyenv root)/versions/2.7.18/bin/python")
fi
candidates+=("$(command -v python2.7 || true)")
py27=
for c in "${candidates[@]}"; do
    if is_py27 "$c"; then
        py27=$c
        break
    fi
done
if [ -z "$py27" ]; then
    echo "setup.sh: Python 2.7 not found (set PYTHON27, or install pyenv's 2.7.18)" >&2
    exit 1
fi

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
wstest="$dir/bin/wstest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# virtualenv itself, installed beside (not into) the Python 2.7 it runs on.
"$py27" -m pip install --quiet --disable-pip-version-check --target "$work/vt" 'virtualenv<20.22' >&2
# Start over only in an empty directory or a broken earlier install.
if [ -n "$(ls -A "$dir")" ] && [ ! -e "$dir/bin/activate" ]; then
    echo "setup.sh: $dir is not empty and not a virtualenv; not touching it" >&2
    exit 1
fi
rm -rf "$dir"
PYTHONPATH="$work/vt" "$py27" -m virtualenv --quiet -p "$py27" "$dir" >&2
"$dir/bin/pip" install --quiet --disable-pip-version-check 'autobahntestsuite==25.10.1' >&2
if ! installed; then
    echo "setup.sh: wstest did not install into $dir" >&2
    exit 1
fi
echo "$dir/bin/wstest"
