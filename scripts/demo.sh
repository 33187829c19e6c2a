#!/usr/bin/env bash
# Set up (see setup.sh), then run the demo: train, sweep w, and write the table, plots and grids.
# Extra arguments go to `cfdg demo`, for example: bash scripts/demo.sh --minutes 10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cfdg demo "$@"
