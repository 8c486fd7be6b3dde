#!/usr/bin/env bash
# memfit's test command: sets up, builds everything, and runs the whole CTest suite
# (tests needing a GPU report as skipped where there is none).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch_data.sh
scripts/build.sh
cd "${MEMFIT_BUILD_DIR:-build}"
exec ctest --output-on-failure --parallel 2 --timeout 600
