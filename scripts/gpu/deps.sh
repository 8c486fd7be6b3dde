#!/usr/bin/env bash
# The C++ libraries memfit needs beyond LibTorch and CUDA, as Debian 12 packages, for a
# machine that has neither them nor a package registry (the GPU check's machine):
#
#   scripts/gpu/deps.sh download   # here (Debian 12): apt-get download into .gpu-deps/
#   scripts/gpu/deps.sh unpack DIR # there: dpkg-deb -x every package into the private
#                                  # prefix DIR (never into /), links made relative
#   scripts/gpu/deps.sh data DIR   # there: the carried data (data.tar.gz) into DIR
#
# `download` also packs what the check's steps read of the data scripts/fetch_data.sh
# fetched (tokenizers, Moby-Dick, Fashion-MNIST's test split) into .gpu-deps/data.tar.gz.
#
# .gpu-deps/ is ignored by git and travels with the working tree; MANIFEST in it lists
# package=version and each file's sha256, and `unpack` checks it. The packages are Debian
# 12's (glibc 2.36, libstdc++ of GCC 12): any x86-64 Linux with glibc >= 2.36 runs them.
set -euo pipefail
# Paths the caller gives are the caller's: resolved before leaving its folder.
abs() { realpath -m -- "$1"; }
[[ -n ${MEMFIT_GPU_DEPS:-} ]] && MEMFIT_GPU_DEPS=$(abs "$MEMFIT_GPU_DEPS")
[[ -n ${MEMFIT_DATA_DIR:-} ]] && MEMFIT_DATA_DIR=$(abs "$MEMFIT_DATA_DIR")
[[ ${1:-} == unpack || ${1:-} == data ]] && [[ -n ${2:-} ]] && set -- "$1" "$(abs "$2")"
cd "$(dirname "$0")/../.."
dir=$(abs "${MEMFIT_GPU_DEPS:-.gpu-deps}")

# Folders never unpacked into or replaced.
protected() {
  case $1 in /|/usr|/usr/local|/opt|/etc|/var|/home|/root|/tmp|"$HOME") return 0 ;; esac
  return 1
}

# Build and run time of proto/, server/, client/, worker/ and tests/ (GoogleTest), found by
# the rehearsal's check (scripts/gpu/check_prefix.py): every header and library the build
# uses outside LibTorch, CUDA and the C/C++ runtime comes from one of these.
PACKAGES=(
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 libprotoc32 protobuf-compiler
  libgrpc++-dev libgrpc++1.51 libgrpc-dev libgrpc29 protobuf-compiler-grpc
  libabsl-dev libabsl20220623
  libc-ares-dev libc-ares2 libre2-dev libre2-9 libssl-dev libssl3 zlib1g-dev zlib1g
  libyaml-cpp-dev libyaml-cpp0.7 nlohmann-json3-dev libcli11-dev
  libsqlite3-dev libsqlite3-0
  prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libprometheus-cpp-push1.0 libcivetweb-dev libcivetweb1 civetweb libcurl4-openssl-dev libcurl4
  libicu-dev libicu72
  libgtest-dev libgmock-dev googletest
)

download() {
  command -v apt-get >/dev/null || { echo "gpu deps: apt-get is needed to download (Debian 12)" >&2; exit 1; }
  local data=${MEMFIT_DATA_DIR:-.memfit/data}
  [[ -f $data/fashion-mnist/t10k-images-idx3-ubyte ]] || {
    echo "gpu deps: no data in $data: run scripts/fetch_data.sh first" >&2; exit 1; }
  # Only a folder this script made (it holds a MANIFEST), an empty one or none is replaced.
  if protected "$dir" || [[ -e $dir && ! -d $dir ]] ||
     [[ -d $dir && ! -f $dir/MANIFEST && -n $(ls -A "$dir") ]]; then
    echo "gpu deps: $dir exists and was not made by this script: refusing to replace it" >&2; exit 1
  fi
  local part
  part=$(mktemp -d "$(dirname "$dir")/.gpu-deps.part.XXXXXX")
  trap 'rm -rf "$part"' EXIT
  (cd "$part" && apt-get download -q "${PACKAGES[@]}" >/dev/null) || {
    echo "gpu deps: apt-get download failed (run 'apt-get update' first?)" >&2; exit 1; }
  (cd "$part" && for f in *.deb; do
     printf '%s=%s %s\n' "$(dpkg-deb -f "$f" Package)" "$(dpkg-deb -f "$f" Version)" "$(sha256sum "$f" | cut -d' ' -f1)"
   done) > "$part/MANIFEST"
  tar -C "$data" -czf "$part/data.tar.gz" gpt2 llama moby-dick \
    fashion-mnist/t10k-images-idx3-ubyte fashion-mnist/t10k-labels-idx1-ubyte
  chmod 755 "$part"
  rm -rf "$dir"
  mv "$part" "$dir"
  trap - EXIT
  echo "gpu deps: $(ls "$dir"/*.deb | wc -l) packages, $(du -sh "$dir" | cut -f1) in $dir"
}

unpack() {
  local prefix=$1
  [[ -f $dir/MANIFEST ]] || { echo "gpu deps: $dir/MANIFEST missing: run scripts/gpu/deps.sh download on a Debian 12 machine" >&2; exit 1; }
  # dpkg-deb where there is one; else the .deb's own layout (an ar archive holding
  # data.tar.*), read with binutils' ar and tar.
  if command -v dpkg-deb >/dev/null; then
    extract() { dpkg-deb -x "$1" "$2"; }
  elif command -v ar >/dev/null; then
    extract() {
      local member
      member=$(ar t "$1" | grep -m1 '^data\.tar') || { echo "gpu deps: $1 has no data.tar" >&2; return 1; }
      ar p "$1" "$member" | case $member in
        *.xz) xz -dc ;; *.zst) zstd -dc ;; *.gz) gzip -dc ;; *) cat ;;
      esac | tar -x -C "$2" -f -
    }
  else
    echo "gpu deps: dpkg-deb or ar is needed to unpack" >&2; exit 1
  fi
  prefix=$(realpath -m "$prefix")
  protected "$prefix" && { echo "gpu deps: refusing to unpack into $prefix" >&2; exit 1; }
  local stamp="$prefix/.memfit-deps"
  if [[ -f $stamp ]] && cmp -s "$stamp" "$dir/MANIFEST"; then return 0; fi
  # Every .deb here is one the MANIFEST lists, and every one it lists is here, checked
  # before anything is replaced.
  local name sum sums missing=() f
  sums=$(find "$dir" -maxdepth 1 -name '*.deb' -print0 | xargs -0r sha256sum)
  while read -r sum f; do
    [[ -n $sum ]] || continue
    grep -q " $sum\$" "$dir/MANIFEST" || { echo "gpu deps: $f does not match $dir/MANIFEST" >&2; exit 1; }
  done <<< "$sums"
  while read -r name sum; do
    [[ -n $name ]] || continue
    grep -q "^$sum " <<< "$sums" || missing+=("$name")
  done < "$dir/MANIFEST"
  [[ ${#missing[@]} -eq 0 ]] || { echo "gpu deps: not carried in $dir: ${missing[*]}" >&2; exit 1; }
  # Only a prefix this script made (it holds the stamp) or an empty folder is replaced.
  if [[ -e $prefix && ! -d $prefix ]]; then
    echo "gpu deps: $prefix exists and is not a folder: refusing to replace it" >&2; exit 1
  fi
  if [[ -d $prefix && ! -f $stamp && -n $(ls -A "$prefix") ]]; then
    echo "gpu deps: $prefix exists and was not made by this script: refusing to replace it" >&2; exit 1
  fi
  rm -rf "$prefix"
  mkdir -p "$prefix"
  echo "partial: being unpacked by scripts/gpu/deps.sh" > "$stamp"
  local n=0
  for f in "$dir"/*.deb; do
    extract "$f" "$prefix" || { echo "gpu deps: unpacking $f failed" >&2; exit 1; }
    n=$((n + 1))
  done
  # Absolute links (/usr/lib/...) would point into the host's /: make them relative.
  local l t
  while IFS= read -r -d '' l; do
    t=$(readlink "$l")
    [[ $t == /* ]] || continue
    ln -sfn "$(realpath -m --relative-to="$(dirname "$l")" "$prefix$t")" "$l"
  done < <(find "$prefix" -type l -print0)
  local want
  want=$(grep -c . "$dir/MANIFEST")
  [[ $n -eq $want ]] || { echo "gpu deps: $n packages in $dir, MANIFEST lists $want: some were not carried" >&2; exit 1; }
  cp "$dir/MANIFEST" "$stamp"
  echo "gpu deps: $n packages unpacked into $prefix"
}

unpack_data() {
  local dest=$1
  protected "$dest" && { echo "gpu deps: refusing to put the data into $dest" >&2; exit 1; }
  [[ -f $dir/data.tar.gz ]] || { echo "gpu deps: $dir/data.tar.gz missing" >&2; exit 1; }
  mkdir -p "$dest"
  tar -C "$dest" --skip-old-files -xzf "$dir/data.tar.gz"  # never over the user's files
  echo "gpu deps: data in $dest"
}

case ${1:-} in
  download) [[ $# -eq 1 ]] || { echo "usage: $0 download" >&2; exit 2; }; download ;;
  data) [[ $# -eq 2 ]] || { echo "usage: $0 data DIR" >&2; exit 2; }; unpack_data "$2" ;;
  unpack) [[ $# -eq 2 ]] || { echo "usage: $0 unpack PREFIX" >&2; exit 2; }; unpack "$2" ;;
  *) echo "usage: $0 download | unpack PREFIX | data DIR" >&2; exit 2 ;;
esac
