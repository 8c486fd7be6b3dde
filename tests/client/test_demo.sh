#!/bin/bash
# scripts/demo.sh end to end in a temporary folder: every job succeeds, estimates are
# within 3% of the measured peaks, the jobs spread over both devices, memfit's LoRA run keeps less than the stock one, the
# outputs exist, and memfitd is stopped at the end.
set -euo pipefail
repo=$1
[[ -f $repo/.memfit/data/gpt2/encoder.json && -f $repo/.memfit/data/fashion-mnist/t10k-labels-idx1-ubyte ]] ||
  { echo "data missing: run scripts/fetch_data.sh (skipped)"; exit 77; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export MEMFIT_DEMO_DIR=$dir/demo
# Into a file, as CI logs and users capture it: the whole output must be there.
log=$dir/demo.log
"$repo/scripts/demo.sh" >"$log" 2>&1 || { cat "$log"; echo "demo.sh failed"; exit 1; }
out=$(tr -d '\0' <"$log")
echo "$out"
fail() { echo "FAIL: $*"; exit 1; }
nul=$(( $(wc -c <"$log") - $(tr -d '\0' <"$log" | wc -c) ))
[[ $nul == 0 ]] || fail "demo.log holds $nul NUL bytes (output truncated by a reopen)"
grep -q "^== memfitd is listening on " <<<"$out" || fail "demo.log lost the output before the first job"
table=$(sed -n '/^job  *state/,/^$/p' <<<"$out")
[[ $(grep -c " succeeded " <<<"$table") == 4 ]] || fail "expected 4 succeeded jobs"
for name in gpt2-pretrain-moby-dick vit-fashion-mnist gpt2-lora-exact gpt2-lora-memfit; do
  row=$(grep "^$name " <<<"$table") || fail "no row for $name"
  err=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /%$/ && $i ~ /^[+-]/) {print $i; exit}}' <<<"$row")
  awk -v e="${err%\%}" 'BEGIN {exit !(e >= -3 && e <= 3)}' || fail "$name: estimate off by $err"
done
# Four jobs on two CPU devices: never two on one device while the other idles.
grep -q "^placement: spread" <<<"$out" || fail "placement: $(grep '^placement:' <<<"$out" || echo 'no placement line')"
grep -q "^vit-fashion-mnist .*accuracy [0-9.]*%" <<<"$table" || fail "no ViT accuracy"
for name in gpt2-pretrain-moby-dick gpt2-lora-exact gpt2-lora-memfit; do  # language models: a loss, not an accuracy
  grep -q "^$name .*val loss [0-9.]*$" <<<"$table" || fail "$name: no validation loss"
done
exact=$(grep "^gpt2-lora-exact " <<<"$table" | awk '{print $5}')
mine=$(grep "^gpt2-lora-memfit " <<<"$table" | awk '{print $5}')
awk -v a="$mine" -v b="$exact" 'BEGIN {exit !(a < b)}' || fail "memfit LoRA peak $mine MiB not below exact $exact MiB"
for d in pretrain/model vit/model lora-exact/adapter lora-memfit/adapter; do
  [[ -d $dir/demo/out/$d ]] || fail "no output $d"
done
# The closing picture, drawn from Prometheus: a PNG of a real size.
grep -q "^== memory over time: $dir/demo/memory.png" <<<"$out" || fail "no memory picture announced"
png=$dir/demo/memory.png
[[ $(head -c 8 "$png" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] || fail "$png is not a PNG"
[[ $(wc -c <"$png") -gt 20000 ]] || fail "$png is only $(wc -c <"$png") bytes"
grep -q "^demo: memfitd stopped" <<<"$out" || fail "memfitd not stopped"
grep -q "^memfitd: stopped" "$dir/demo/memfitd.log" || fail "memfitd did not stop cleanly"
echo "demo OK: exact LoRA peak $exact MiB, memfit LoRA peak $mine MiB"
