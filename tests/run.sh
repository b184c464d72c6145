#!/usr/bin/env bash
# The one test command: installs whatever is missing (apt, venvs, Cura's
# code), then runs the whole suite against both Klippy flavours.
# Extra arguments go to pytest, e.g. ./tests/run.sh -k upload -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup_env.sh
exec .venv/test/bin/python -m pytest "$@"
