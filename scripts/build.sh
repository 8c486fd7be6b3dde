#!/usr/bin/env bash
# Configures (once) and builds memfit into build/. Binaries land in build/bin/.
#   scripts/build.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MEMFIT_BUILD_DIR:-build}
if [[ ! -f "$build/build.ninja" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
# Two cores: LibTorch translation units take about 1 GB of RAM each.
cmake --build "$build" --parallel "${MEMFIT_JOBS:-2}" ${1:+--target "$@"}
