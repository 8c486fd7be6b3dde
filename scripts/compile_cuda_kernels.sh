#!/usr/bin/env bash
# Compiles memfit's CUDA kernels with nvcc for sm_80 and sm_90 without running them, so
# that the CPU-only build keeps them compiling. Exit 77 (CTest: skipped) without nvcc.
#   compile_cuda_kernels.sh NVCC OUT_DIR INCLUDE_DIR FILE.cu...
set -euo pipefail
nvcc=${1:-}
out=$2
inc=$3
shift 3
if [[ -z "$nvcc" || "$nvcc" == *NOTFOUND || ! -x "$nvcc" ]]; then
  echo "nvcc not found: CUDA kernels not compiled (skipped)"
  exit 77
fi
mkdir -p "$out"
"$nvcc" --version | tail -n 2
for cu in "$@"; do
  obj="$out/$(basename "${cu%.cu}").o"
  echo "nvcc $cu"
  "$nvcc" -std=c++17 -O3 -Xcompiler=-Wall,-Wextra -Werror=all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -I "$inc" -c "$cu" -o "$obj"
done
echo "compiled $# CUDA sources for sm_80 and sm_90"
