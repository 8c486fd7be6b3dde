#!/usr/bin/env bash
# The op benchmark: sets up, builds and runs it, which prints memfit's
# memory-efficient ops next to the stock LibTorch ops and transformer blocks in four
# memory modes (docs/PERFORMANCE.md explains the table). Extra arguments go to the
# benchmark, e.g. --json or --reps 3.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh memfit-bench-ops
exec build/bin/memfit-bench-ops "$@"
