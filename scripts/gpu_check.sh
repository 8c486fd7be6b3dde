#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, nvcc, CMake, Ninja and a CUDA
# PyTorch (its LibTorch 2.x and CMake files), but perhaps no GoogleTest:
#   1. builds memfit's ops with -DMEMFIT_CUDA=ON against PyTorch's LibTorch,
#   2. runs the `gpu`-labelled tests (CUDA kernels against the CPU bodies),
#   3. runs the op and block benchmark on the GPU.
# Logs go to ${OUT:-gpu-check}/. GoogleTest comes from the system if installed, else from
# the sources in ${MEMFIT_GTEST_SOURCE_DIR} (e.g. a copy of Debian's /usr/src/googletest).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
torch_prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)') || {
  echo "gpu_check: no PyTorch for $py" >&2; exit 1; }
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' |
  tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/env.txt" 2>&1

extra=()
[[ -n "${MEMFIT_GTEST_SOURCE_DIR:-}" ]] && extra+=(-DMEMFIT_GTEST_SOURCE_DIR="$MEMFIT_GTEST_SOURCE_DIR")
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DMEMFIT_CUDA=ON -DMEMFIT_OPS_ONLY=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${MEMFIT_CUDA_ARCHS:-80;90}" -DCMAKE_PREFIX_PATH="$torch_prefix" \
  "${extra[@]}" 2>&1 | tee "$out/configure.log"
cmake --build build-cuda --parallel "${MEMFIT_JOBS:-16}" \
  --target memfit_gpu_tests memfit_ops_tests memfit-bench-ops 2>&1 | tee "$out/build.log"
status=${PIPESTATUS[0]}
[[ $status -eq 0 ]] || { echo "gpu_check: build failed (see $out/build.log)"; exit "$status"; }

rc=0
build-cuda/bin/memfit_gpu_tests 2>&1 | tee "$out/gpu_tests.log" || rc=1
build-cuda/bin/memfit_ops_tests 2>&1 | tail -n 40 > "$out/ops_tests_tail.log" || rc=1
build-cuda/bin/memfit-bench-ops --device cuda --reps 20 2>&1 | tee "$out/bench_cuda.txt" || rc=1
build-cuda/bin/memfit-bench-ops --device cuda --reps 20 --json > "$out/bench_cuda.json" 2>&1 || rc=1
exit $rc
