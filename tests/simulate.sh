#!/usr/bin/env bash
# Run a simulated Klipper printer with cura_connection, for Cura by hand:
#   ./tests/simulate.sh [--port 8080] [--address 127.0.0.1] [--zeroconf]
#                       [--flavor klipper|kalico] [--move-delay 0.01] [--reset]
# The first start installs only what the chosen flavour needs: its Klippy venv
# with the module's requirements and libcharon (tests/setup_env.sh --klippy).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
flavor=klipper
prev=""
for a in "$@"; do
    case "$a" in
        -h|--help) exec python3 "$ROOT/tests/support/simulated_printer.py" --help ;;
        --flavor=*) flavor=${a#--flavor=} ;;
    esac
    if [ "$prev" = --flavor ]; then flavor=$a; fi
    prev=$a
done
case "$flavor" in
    klipper|kalico) bash "$ROOT/tests/setup_env.sh" --klippy "$flavor" ;;
    *) exec python3 "$ROOT/tests/support/simulated_printer.py" "$@" ;;   # argparse explains
esac
exec "$ROOT/.venv/$flavor/bin/python" "$ROOT/tests/support/simulated_printer.py" "$@"
