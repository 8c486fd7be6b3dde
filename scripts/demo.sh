#!/usr/bin/env bash
# memfit's main command: install what is missing, build, start memfitd on its embedded
# defaults (two 8 GiB CPU devices, SQLite state under .memfit/demo, loopback), and run
# real jobs through the `memfit` CLI:
#   1. a small GPT-2-shaped model pretrained from scratch on Moby-Dick (GPT-2 tokenizer),
#      next to a ViT trained on Fashion-MNIST, both on memfit's ops;
#   2. LoRA fine-tuning of that checkpoint on later chapters, twice at once: stock ops
#      (exact) and memfit's ops (memfit_best), same seed;
# then print each job's estimated vs measured peak memory, the activation memory memfit's
# ops saved, the final validation metrics and where the outputs are, and stop memfitd.
# A few minutes on 2 cores once built. Options: --keep (leave memfitd running),
# --placement best_fit (memfitd's memory-only placement, to compare; default spread).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
placement=spread
while (($#)); do
  case $1 in
    --keep) keep=true ;;
    --placement)
      [[ ${2:-} == spread || ${2:-} == best_fit ]] || { echo "demo: --placement: spread or best_fit, got '${2:-}'" >&2; exit 2; }
      placement=$2
      shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown option '$1' (--keep, --placement spread|best_fit)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z ${MEMFIT_DEMO_PREBUILT:-} ]]; then  # set by the CTest that runs this demo
  scripts/setup.sh
  scripts/fetch_data.sh
  scripts/build.sh memfitd memfit memfit-worker
fi

root=$PWD
data=${MEMFIT_DATA_DIR:-$root/.memfit/data}
demo=${MEMFIT_DEMO_DIR:-$root/.memfit/demo}
build=${MEMFIT_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
bin=$build/bin
rm -rf "$demo"
mkdir -p "$demo/specs" "$demo/data" "$demo/out"

# The data: chapters 1-100 to pretrain, 101-130 to fine-tune, 131-135 to validate.
cat_chapters() { for i in $(seq "$1" "$2"); do cat "$data/moby-dick/chapter_$i.txt"; done; }
cat_chapters 1 100 > "$demo/data/pretrain.txt"
cat_chapters 101 130 > "$demo/data/finetune.txt"
cat_chapters 131 135 > "$demo/data/validation.txt"
cat > "$demo/specs/gpt2-small.json" <<JSON
{"model_type": "gpt2", "vocab_size": 50257, "n_embd": 128, "n_layer": 4, "n_head": 4,
 "n_positions": 128, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
JSON
cat > "$demo/specs/vit-tiny.json" <<JSON
{"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
 "intermediate_size": 128, "image_size": 28, "patch_size": 7, "num_channels": 1,
 "hidden_act": "gelu", "layer_norm_eps": 1e-12, "num_labels": 10}
JSON
cat > "$demo/specs/pretrain.yaml" <<YAML
name: gpt2-pretrain-moby-dick
model: {architecture: gpt2, config_path: $demo/specs/gpt2-small.json, init_seed: 1}
data:
  train_path: $demo/data/pretrain.txt
  validation_path: $demo/data/validation.txt
  format: text
  tokenizer_path: $data/gpt2
method: {kind: full}
memory: {preset: memfit_best}
training: {steps: 300, micro_batch: 8, sequence_length: 64, learning_rate: 0.004, warmup_steps: 15,
           eval_interval: 100, eval_batches: 16, seed: 11, log_interval: 5}
output_dir: $demo/out/pretrain
YAML
cat > "$demo/specs/vit.yaml" <<YAML
name: vit-fashion-mnist
model: {architecture: vit, config_path: $demo/specs/vit-tiny.json, init_seed: 1}
data:
  train_path: $data/fashion-mnist/train-images-idx3-ubyte
  train_labels_path: $data/fashion-mnist/train-labels-idx1-ubyte
  validation_path: $data/fashion-mnist/t10k-images-idx3-ubyte
  validation_labels_path: $data/fashion-mnist/t10k-labels-idx1-ubyte
  format: idx
method: {kind: full}
memory: {preset: memfit_best}
training: {steps: 700, micro_batch: 64, learning_rate: 0.002, warmup_steps: 30, weight_decay: 0.01,
           eval_batches: 40, seed: 3, log_interval: 20}
output_dir: $demo/out/vit
YAML
for mode in exact memfit; do
  if [[ $mode == exact ]]; then memory="{activation: exact, norm: exact, attention: standard}"
  else memory="{preset: memfit_best}"; fi
  cat > "$demo/specs/lora-$mode.yaml" <<YAML
name: gpt2-lora-$mode
model: {architecture: gpt2, config_path: $demo/out/pretrain/model/config.json,
        weights_path: $demo/out/pretrain/model/model.safetensors}
data:
  train_path: $demo/data/finetune.txt
  validation_path: $demo/data/validation.txt
  format: text
  tokenizer_path: $data/gpt2
method: {kind: lora, lora: {rank: 8, alpha: 16}}
memory: $memory
training: {steps: 100, micro_batch: 8, sequence_length: 64, learning_rate: 0.01, warmup_steps: 6,
           eval_batches: 16, seed: 11, log_interval: 5}
output_dir: $demo/out/lora-$mode
YAML
done

# memfitd on its embedded defaults, on free loopback ports.
# Jobs read the demo's data and the fetched tokenizer and write below $demo/out (a shared
# deployment names such folders per user: docs/DAEMON.md).
"$bin/memfitd" --state-dir "$demo/state" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --read-root "$demo" --read-root "$data" --write-root "$demo/out" --placement "$placement" \
  2> "$demo/memfitd.log" &
daemon=$!
prom=""
stop_daemon() {
  if [[ -n $prom ]] && kill -0 "$prom" 2>/dev/null; then
    kill -TERM "$prom"
    wait "$prom" || true
  fi
  if kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon"
    wait "$daemon" || true
    echo "demo: memfitd stopped (its log: $demo/memfitd.log)"
  fi
}
$keep || trap stop_daemon EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$demo/memfitd.log" 2>/dev/null && break
  kill -0 "$daemon" 2>/dev/null || { cat "$demo/memfitd.log" >&2; exit 1; }
  sleep 0.1
done
export MEMFIT_SERVER
MEMFIT_SERVER=$(sed -n 's/^memfitd: listening on \([^ ]*\).*/\1/p' "$demo/memfitd.log")
metrics=$(sed -n 's|^memfitd: metrics on \(.*\)|\1|p' "$demo/memfitd.log")
echo
echo "== memfitd is listening on $MEMFIT_SERVER (metrics: $metrics)"
sed -n '/^device /p' "$demo/memfitd.log"

# Debian's Prometheus beside memfitd (loopback, its own folder under the demo's), scraping
# it every second with the shipped rules and console page: the closing picture reads the
# jobs' memory back from it. Without prometheus the demo goes on without the picture.
prom_url=""
started=$(date +%s)
if command -v prometheus >/dev/null; then
  mport=${metrics#http://127.0.0.1:}
  mport=${mport%%/*}
  pport=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$demo/prometheus"
  cat > "$demo/prometheus/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [$root/deploy/prometheus/memfit_rules.yml]
scrape_configs:
  - job_name: memfitd
    static_configs: [{targets: ['127.0.0.1:$mport']}]
YAML
  prometheus --config.file="$demo/prometheus/prometheus.yml" --storage.tsdb.path="$demo/prometheus/data" \
    --web.listen-address="127.0.0.1:$pport" --web.console.templates="$root/deploy/prometheus/consoles" \
    --web.console.libraries="$root/deploy/prometheus/console_libraries" 2> "$demo/prometheus/prometheus.log" &
  prom=$!
  prom_url=http://127.0.0.1:$pport
  echo "== Prometheus on $prom_url, scraping memfitd every second (dashboard: $prom_url/consoles/memfit.html)"
fi
memfit() { "$bin/memfit" "$@"; }
# Submits a spec, shows memfit's line and returns the job id. (Not `tee /dev/stderr`:
# when the output goes to a file, that reopens it with truncation.)
submit() {
  local line
  line=$(memfit submit -f "$@")
  echo "$line" >&2
  echo "${line%% *}"
}

echo
echo "== 1. pretrain a GPT-2-shaped model on Moby-Dick, and a ViT on Fashion-MNIST, side by side;"
echo "      the two LoRA jobs of step 2 wait for the pretraining (submit --after)"
pre=$(submit "$demo/specs/pretrain.yaml")
vit=$(submit "$demo/specs/vit.yaml")
exact=$(submit "$demo/specs/lora-exact.yaml" --after "$pre")
mine=$(submit "$demo/specs/lora-memfit.yaml" --after "$pre")
sleep 2
memfit devices
echo
memfit watch "$pre"

echo
echo "== 2. LoRA on that checkpoint: stock ops and memfit's ops, at once"
sleep 2
memfit devices
echo
memfit watch "$mine"
memfit watch "$exact" > /dev/null
memfit watch "$vit" > /dev/null || true

echo
echo "== jobs"
memfit list
echo
echo "== placement: each job's device and run time"
memfit devices -o json > "$demo/devices.json"
memfit list -o json > "$demo/jobs.json"
/usr/bin/python3 "$root/scripts/demo_placement.py" "$demo/devices.json" "$demo/jobs.json"
echo
echo "== memory and results"
/usr/bin/python3 "$root/scripts/demo_summary.py" < "$demo/jobs.json"
echo
echo "estimated = memfitd's estimate before the job ran; measured = the worker's peak; saved ="
echo "activation memory memfit's ops keep less than the stock ops would (estimated, per step)."
if [[ -n $prom_url ]]; then
  # Wait for Prometheus to have scraped every job's end, then draw.
  q="$prom_url/api/v1/query?query=count(memfit_job_measured_peak_bytes%7Bstate!%3D%22running%22%7D)"
  for _ in $(seq 60); do
    n=$(/usr/bin/python3 -c 'import json, sys, urllib.request
r = json.load(urllib.request.urlopen(sys.argv[1]))["data"]["result"]
print(r[0]["value"][1] if r else 0)' "$q" 2>/dev/null || echo 0)
    [[ $n -ge 4 ]] && break
    sleep 0.5
  done
  if /usr/bin/python3 "$root/scripts/demo_plot.py" --prometheus "$prom_url" --start "$started" --end "$(date +%s)" \
       --out "$demo/memory.png" > /dev/null; then
    echo
    echo "== memory over time: $demo/memory.png"
    echo "   each job's measured memory against its estimate and reservation, read back from Prometheus"
  else
    echo "demo: the memory picture failed (Prometheus log: $demo/prometheus/prometheus.log)" >&2
  fi
fi
if $keep; then
  echo "memfitd keeps running (pid $daemon): MEMFIT_SERVER=$MEMFIT_SERVER $bin/memfit list"
  [[ -n $prom ]] && echo "Prometheus keeps running (pid $prom): $prom_url/consoles/memfit.html"
fi
