#!/usr/bin/env bash
# Run a simulated Klipper printer with cura_connection, for Cura by hand:
#   ./tests/simulate.sh [--port 8080] [--address 127.0.0.1] [--zeroconf]
#                       [--flavor klipper|kalico] [--move-delay 0.01] [--reset]
# Installs the test environment first if it is missing (tests/setup_env.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for v in klipper kalico test; do
    if [ ! -f "$ROOT/.venv/$v/.done" ]; then
        bash "$ROOT/tests/setup_env.sh"
        break
    fi
done
exec "$ROOT/.venv/test/bin/python" "$ROOT/tests/simulated_printer.py" "$@"
