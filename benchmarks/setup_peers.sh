#!/usr/bin/env bash
# Create or update the benchmark venv (.bench-venv, separate from the project's
# .venv): the peers from requirements-peers.txt, as their users install them,
# plus remote-exec itself, editable. Safe to re-run: when neither
# requirements-peers.txt nor pyproject.toml changed since the last successful
# run, it only says so. --force reinstalls anyway.
#
#   benchmarks/setup_peers.sh [--force]
#   PYTHON=python3.12 BENCH_VENV=/tmp/venv benchmarks/setup_peers.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${BENCH_VENV:-$repo/.bench-venv}"
python="${PYTHON:-python3.11}"
force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
fi

command -v "$python" >/dev/null || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup_peers: $python is older than 3.11; set PYTHON=..." >&2
    exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup_peers: creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi

stamp="$venv/.bench-peers-stamp"
want="$(cat "$here/requirements-peers.txt" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ $force == 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup_peers: $venv is up to date"
    exit 0
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -r "$here/requirements-peers.txt"

# remote-exec may not import fully while it is being written: its subjects then
# report "not available", and the peers still run. So a failure here warns only
# (and leaves the stamp out, so the next run tries again).
if ! "${pip[@]}" install --quiet -e "$repo"; then
    echo "setup_peers: warning: 'pip install -e $repo' failed; remote-exec subjects will be skipped" >&2
    exit 0
fi
"${pip[@]}" check || echo "setup_peers: warning: pip check found conflicts (see above)" >&2

echo "$want" >"$stamp"
echo "setup_peers: ready: $venv/bin/python benchmarks/run.py --quick"
