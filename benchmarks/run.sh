#!/usr/bin/env bash
# One command for the cura_connection benchmark suite:
#   ./benchmarks/run.sh [--quick] [--runs N] [--no-moonraker] [--no-serving]
#                       [--quiet-wait S] [--profile] [--keep]
#                       [--flood S] [--upload-runs N] [--sessions N]
#                       [--session-seconds S] [--queue-sessions N]
#                       [--queue-seconds S]
#                       [--front-cpu 0|1]
# Installs what it needs (idempotent), runs bench.py, prints the tables and
# writes benchmarks/results/ (results.json, table.md, lateness.png,
# serving.png).  --quick: only the serving goal table (serving.py), about
# 8 minutes.  The full run takes about 25 minutes on 2 cores; the first run
# also generates ~1.3 GB of input files under .cache/bench/files.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS="$ROOT/.venv"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# Klippy flavours, libcharon, the test venv: the test suite's own setup
bash "$ROOT/tests/setup_env.sh" >/dev/null

# unzip: the baseline for UFP uploads
if ! command -v unzip >/dev/null; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends unzip
fi

make_venv() {   # dir, requirements file
    local v="$1" req="$2" stamp
    stamp="$v/.done-$(sha1sum "$req" | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        rm -rf "$v"
        python3 -m venv "$v"
        "$v/bin/pip" install -q --disable-pip-version-check -r "$req"
        touch "$stamp"
    fi
}
make_venv "$VENVS/bench" "$ROOT/benchmarks/requirements.txt"
# libcharon is not on PyPI: the UFP generator uses Debian's, like the tests
site=$("$VENVS/bench/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/Charon "$site/Charon"

exec "$VENVS/bench/bin/python" "$ROOT/benchmarks/bench.py" "$@"
