#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine that has a CUDA PyTorch (its LibTorch and
# CMake files), nvcc, CMake, Ninja and a C++ compiler, but none of memfit's other C++
# libraries and no package registry. docs/GPU.md says what it measures and how to read it.
#
#   scripts/gpu/deps.sh download       # first, on a Debian 12 machine with the repo
#   scripts/gpu_check.sh               # then, on the GPU machine (with .gpu-deps/ beside)
#   scripts/gpu_check.sh --rehearse    # here: the same against the CPU LibTorch, --device cpu
#   scripts/gpu_check.sh --rehearse --tiny   # the same on tiny inputs
#   scripts/gpu_check.sh --ci          # the test command's short form (see below)
#   scripts/gpu_check.sh --budget 420  # seconds for the whole check (default 540)
#   scripts/gpu_check.sh --steps 3,5 --prebuilt bin.tar.gz   # again, without building
#
# It unpacks the carried Debian packages into a private prefix (never into /), builds the
# ops, worker, estimator, CLI, daemon, tests and benchmarks with MEMFIT_CUDA=ON against the
# GPU machine's LibTorch and that prefix alone (checked: scripts/gpu/check_prefix.py),
# then runs the measuring steps (scripts/gpu/steps.py), each under a time limit scaled to
# what is left of the budget after the build, writing summary.md, results.json and
# logs.tar.gz (every log, the build's too) into ${OUT:-gpu-check}/ after every step, and
# bin.tar.gz (the programs built, for --prebuilt on a fresh machine of the same image).
#
# --ci: unpacks into the prefix, configures and builds one target (the CLI, which needs
# protobuf, gRPC, Abseil, yaml-cpp and nlohmann-json) against the prefix alone, checks it,
# and runs the step runner on tiny inputs with the main build (build/).
#
# Environment: OUT (results; a second run into the same folder replaces them), PYTHON
# (the PyTorch Python), MEMFIT_JOBS (build jobs), MEMFIT_CUDA_ARCHS (default: the GPU's
# compute capability), MEMFIT_GPU_PREFIX, MEMFIT_GPU_DEPS (the carried packages, default
# .gpu-deps), MEMFIT_DATA_DIR, MEMFIT_GPU_GRID=validation (step 3 at other shapes).
# --budget: at least 120 s (60 s with --prebuilt).

set -uo pipefail
# Paths from the environment are the caller's: resolve them before leaving its folder.
out=$(realpath -m "${OUT:-$(dirname "$0")/../gpu-check}")
[[ -n ${MEMFIT_GPU_PREFIX:-} ]] && MEMFIT_GPU_PREFIX=$(realpath -m "$MEMFIT_GPU_PREFIX")
[[ -n ${MEMFIT_DATA_DIR:-} ]] && MEMFIT_DATA_DIR=$(realpath -m "$MEMFIT_DATA_DIR")
[[ -n ${MEMFIT_GPU_DEPS:-} ]] && export MEMFIT_GPU_DEPS=$(realpath -m "$MEMFIT_GPU_DEPS")
caller=$PWD
cd "$(dirname "$0")/.."
repo=$(pwd)
usage() { echo "gpu_check: $*" >&2; exit 2; }
mode=gpu
tiny=()
budget=540
steps=1,2,3,4,5,6
prebuilt=
while [[ $# -gt 0 ]]; do
  case $1 in
    --rehearse) mode=rehearse ;;
    --ci) mode=ci ;;
    --tiny) tiny=(--tiny) ;;
    --budget) [[ $# -ge 2 ]] || usage "--budget needs whole seconds"; budget=$2; shift ;;
    --steps) [[ $# -ge 2 ]] || usage "--steps needs a list such as 1,2,5"; steps=$2; shift ;;
    --prebuilt)
      [[ $# -ge 2 && -n $2 ]] || usage "--prebuilt needs a bin.tar.gz"
      prebuilt=$2
      [[ $prebuilt == /* ]] || prebuilt=$caller/$prebuilt
      [[ -f $prebuilt ]] || usage "--prebuilt: no file '$2'"
      shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $budget =~ ^[0-9]+$ ]] || usage "--budget takes whole seconds, got '$budget'"
min_budget=$([[ -n $prebuilt ]] && echo 60 || echo 120)
[[ $budget -ge $min_budget ]] || usage "--budget: at least $min_budget s (the build and the steps), got $budget"
step_names='1|2|3|4|5|6|tests|bench|estimator|headline|daemon|ablation'
[[ $steps =~ ^($step_names)(,($step_names))*$ ]] ||
  usage "--steps: '$steps' is not a comma-separated list of 1-6 or tests, bench, estimator, headline, daemon, ablation"
mkdir -p "$out" 2>/dev/null && [[ -d $out && -w $out ]] || usage "OUT=$out is not a folder this user can write"
start=$(date +%s)
log() { echo "gpu_check [$(( $(date +%s) - start ))s] $*" | tee -a "$out/check.log"; }
: > "$out/check.log"
fail() { log "FAILED: $*"; exit 1; }
pack_logs() { tar -C "$(dirname "$work")" -czf "$out/logs.tar.gz" "$(basename "$work")"; }

prefix=${MEMFIT_GPU_PREFIX:-$repo/build-gpu-prefix}
case $mode in
  gpu) build=build-cuda ;;
  rehearse) build=build-rehearse ;;
  ci) build=build-prefix-ci ;;
esac
work=$repo/$build/gpu-check-work   # every log; packed into $out/logs.tar.gz
rm -rf "$work"
mkdir -p "$work"

# 1. The private prefix and the data.
log "unpacking the carried packages into $prefix"
scripts/gpu/deps.sh unpack "$prefix" 2>&1 | tee -a "$out/check.log" || fail "scripts/gpu/deps.sh unpack"
libdir=$prefix/usr/lib/x86_64-linux-gnu
# zlib1g installs into /lib, the rest into /usr/lib.
export LD_LIBRARY_PATH=$libdir:$prefix/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$prefix/usr/bin:$PATH
# pkg-config (gRPC's CMake files ask it for RE2) reads the prefix's .pc files, and the
# folders they name are taken inside the prefix.
export PKG_CONFIG_LIBDIR=$libdir/pkgconfig:$prefix/usr/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$prefix
unset PKG_CONFIG_PATH
data=${MEMFIT_DATA_DIR:-$repo/.memfit/data}
if [[ ! -f $data/fashion-mnist/t10k-images-idx3-ubyte ]]; then
  scripts/gpu/deps.sh data "$data" || fail "unpacking the carried data"
fi

# 2. LibTorch: the GPU machine's PyTorch, or Debian's CPU LibTorch when rehearsing.
py=${PYTHON:-python3}
cuda=OFF
archs=()
torch_args=()
check_args=()
if [[ $mode == gpu ]]; then
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH=$PATH:/usr/local/cuda/bin
  fi
  torch_prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)') || fail "no PyTorch for $py"
  torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    > "$work/env.txt" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv >> "$work/env.txt" 2>&1
  { g++ --version | head -1; nvcc --version | tail -1; cmake --version | head -1;
    grep PRETTY_NAME /etc/os-release; ldd --version | head -1; } >> "$work/env.txt" 2>&1
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  archs=(-DCMAKE_CUDA_ARCHITECTURES="${MEMFIT_CUDA_ARCHS:-${cap:-90}}")
  cuda=ON
  torch_args=(-DCMAKE_PREFIX_PATH="$prefix/usr;$torch_prefix")
  check_args=(--torch-lib "$torch_lib" --torch-include "$(dirname "$torch_lib")/include")
  device=cuda
else
  torch_dir=$(dirname "$(dpkg -L libtorch-dev | grep -m1 '/TorchConfig.cmake$')")
  torch_lib=$(dirname "$(dpkg -L libtorch1.13 | grep -m1 '/libtorch.so')")
  # The worker's private protobuf archive, as on the GPU machine (proto/CMakeLists.txt).
  torch_args=(-DCMAKE_PREFIX_PATH="$prefix/usr" -DTorch_DIR="$torch_dir" -DMEMFIT_WORKER_STATIC_PROTOBUF=ON)
  # Debian's LibTorch headers include glog and gflags: they are LibTorch's here.
  check_args=(--torch-lib "$torch_lib" --torch-package libtorch-dev --torch-package libgoogle-glog-dev
              --torch-package libgflags-dev)
  device=cpu
  { echo "rehearsal: Debian LibTorch $(dpkg-query -W -f '${Version}' libtorch-dev), CPU"; g++ --version | head -1; } > "$work/env.txt"
fi
tee -a "$out/check.log" < "$work/env.txt"

# 3. Configure and build against the prefix alone: system package folders are left out of
# CMake's search (CMAKE_IGNORE_PREFIX_PATH) and the result is checked below.
jobs=${MEMFIT_JOBS:-$(nproc)}
if [[ $mode == ci ]]; then
  targets=(memfit)
  programs=(bin/memfit)
else
  targets=(memfit-worker memfit memfitd memfit_gpu_tests memfit_ops_tests memfit-bench-ops)
  programs=(bin/memfit-worker bin/memfit bin/memfitd bin/memfit_gpu_tests bin/memfit_ops_tests bin/memfit-bench-ops)
fi
if [[ -n $prebuilt ]]; then
  log "using the programs in $prebuilt (no build)"
  mkdir -p "$build"
  tar -C "$build" -xzf "$prebuilt" || fail "unpacking $prebuilt"
else
  log "configuring $build (MEMFIT_CUDA=$cuda)"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMEMFIT_CUDA=$cuda "${archs[@]}" \
    "${torch_args[@]}" -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$libdir" \
    -DCMAKE_SHARED_LINKER_FLAGS="-Wl,-rpath-link,$libdir" > "$work/configure.log" 2>&1 ||
    { tail -n 40 "$work/configure.log" | tee -a "$out/check.log"; pack_logs; fail "configure"; }
  log "building ${targets[*]} with $jobs jobs"
  # -k 0: every error in one run, not only the first (a borrowed GPU's minutes are few).
  # The build gets what the budget leaves after 90 s of steps, so a slow one still
  # leaves its log behind rather than being killed from outside.
  build_limit=$(( budget - ($(date +%s) - start) - 90 ))
  [[ $build_limit -ge 30 ]] || build_limit=30
  timeout -k 10 "$build_limit" cmake --build "$build" --parallel "$jobs" --target "${targets[@]}" -- -k 0 \
    > "$work/build.log" 2>&1
  build_rc=$?
  if [[ $build_rc -ne 0 ]]; then
    grep -E -m 30 -A6 'error|FAILED' "$work/build.log" | head -200 | tee -a "$out/check.log"
    tail -n 20 "$work/build.log" >> "$out/check.log"
    pack_logs
    [[ $build_rc -eq 124 ]] && fail "build: stopped at its limit of $build_limit s (--budget $budget)"
    fail "build"
  fi
  log "build done"
  [[ $mode == ci ]] || tar -C "$build" -czf "$out/bin.tar.gz" "${programs[@]}"
  "$py" scripts/gpu/check_prefix.py --build "$build" --prefix "$prefix" "${check_args[@]}" \
    --programs "${programs[@]}" > "$work/check_prefix.log" 2>&1
  prefix_ok=$?
  tail -n 8 "$work/check_prefix.log" | tee -a "$out/check.log"
  # On the GPU machine a stray path is reported, not fatal: the build worked there.
  [[ $mode == gpu || $prefix_ok -eq 0 ]] || { pack_logs; fail "the build used files from outside the prefix"; }
fi

# 4. The measuring steps.
if [[ $mode == ci ]]; then
  steps_build=build
  tiny=(--tiny)
else
  steps_build=$build
fi
left=$(( budget - ($(date +%s) - start) - 10 ))
[[ $left -ge 30 ]] || { pack_logs; fail "no time left for the steps (budget $budget s)"; }
log "measuring (steps $steps) on $device in $left s"
"$py" scripts/gpu/steps.py --build "$steps_build" --device "$device" --out "$out" --logs "$work" \
  --data "$data" --steps "$steps" --budget "$left" "${tiny[@]}" --env "mode=$mode" \
  --env "commit=$(git rev-parse --short=12 HEAD 2>/dev/null)"
rc=$?
log "done (steps exit $rc); results in $out/summary.md"
exit $rc
