#!/bin/bash
# The deploy/ files are valid: Prometheus accepts the scrape config and the rules, every
# rule passes its promtool unit test (deploy/prometheus/tests/), and memfitd reads the
# example configuration with the values it says (and refuses bad metrics settings).
# usage: check_deploy.sh MEMFITD REPO
set -euo pipefail
memfitd=$1
repo=$2
if ! command -v promtool >/dev/null; then
  echo "promtool missing (Debian: prometheus)"
  exit 1
fi
prom=$repo/deploy/prometheus
promtool check config "$prom/prometheus.yml"
promtool check rules "$prom/memfit_rules.yml"
# Every recording and alerting rule has a promtool unit test, and they pass.
promtool test rules "$prom"/tests/*.yml
for name in $(sed -n 's/^ *- record: *\([^ ]*\).*/\1/p' "$prom/memfit_rules.yml"); do
  grep -qE "expr: *$name([{ ]|\$)" "$prom"/tests/*.yml || { echo "recording rule $name has no promql_expr_test in $prom/tests"; exit 1; }
done
for name in $(sed -n 's/^ *- alert: *\([^ ]*\).*/\1/p' "$prom/memfit_rules.yml"); do
  grep -qE "alertname: *$name *\$" "$prom"/tests/*.yml || { echo "alert $name has no alert_rule_test in $prom/tests"; exit 1; }
done
# Rules run as often as the scrape (a recording rule must not lag its series by a minute),
# and MemfitDown watches the scrape job the config defines.
scrape=$(sed -n 's/^ *scrape_interval: *\([0-9a-z]*\).*/\1/p' "$prom/prometheus.yml")
eval_iv=$(sed -n 's/^ *evaluation_interval: *\([0-9a-z]*\).*/\1/p' "$prom/prometheus.yml")
[ -n "$eval_iv" ] && [ "$eval_iv" = "$scrape" ] || { echo "prometheus.yml: evaluation_interval '$eval_iv' must equal scrape_interval '$scrape'"; exit 1; }
jobname=$(sed -n 's/^ *- job_name: *\([^ ]*\).*/\1/p' "$prom/prometheus.yml")
grep -qF "up{job=\"$jobname\"}" "$prom/memfit_rules.yml" || { echo "MemfitDown must watch up{job=\"$jobname\"}"; exit 1; }
# workers.user must exist where memfitd runs: this machine has no memfit-worker user, so
# the check reads the file with an account every machine has.
cfg=$(mktemp)
trap 'rm -f "$cfg"' EXIT
sed 's/user: memfit-worker/user: nobody/' "$repo/deploy/memfitd.yaml" > "$cfg"
out=$("$memfitd" --config "$cfg" --check-config)
echo "$out"
for want in 'listen: "127.0.0.1:7540"' 'state_dir: "/var/lib/memfit"' 'tokens_file: "/etc/memfit/tokens"' \
            'cpu_device_memory: 17179869184' 'margin: 0.08' 'cancel_grace_seconds: 60' \
            'read_roots: ["/models", "/data/{user}"]' 'write_roots: ["/data/{user}/runs"]' \
            'workers: {user: "nobody", memory_allowance: 2147483648' 'max_user_priority: 10' 'crash_retries: 2' \
            'metrics: {finished_retention_seconds: 600, finished_max_jobs: 1000}' 'placement: spread}'; do
  grep -qF "$want" <<<"$out" || { echo "memfitd --check-config: missing '$want'"; exit 1; }
done
# A bad metrics setting stops memfitd (exit 2) with a message naming it.
for bad in 'metrics: {finished_retention_seconds: -5}' 'metrics: {finished_retention_seconds: soon}' \
           'metrics: {finished_retention_seconds: 1000000}' 'metrics: {finished_max_jobs: -1}' 'metrics: {retention: 5}'; do
  echo "$bad" > "$cfg"
  set +e
  err=$("$memfitd" --config "$cfg" --check-config 2>&1 >/dev/null)
  rc=$?
  set -e
  key=$(sed 's/^metrics: {\([a-z_]*\):.*/\1/' <<<"$bad")
  if [ "$rc" -ne 2 ] || ! grep -qF "metrics.$key" <<<"$err"; then
    echo "memfitd --check-config with '$bad': exit $rc, '$err' (want exit 2 naming metrics.$key)"
    exit 1
  fi
  echo "rejected as expected: $err"
done
# placement is spread or best_fit; anything else stops memfitd naming the setting.
for bad in 'scheduling: {placement: fastest}' 'scheduling: {placement: ""}'; do
  echo "$bad" > "$cfg"
  set +e
  err=$("$memfitd" --config "$cfg" --check-config 2>&1 >/dev/null)
  rc=$?
  set -e
  if [ "$rc" -ne 2 ] || ! grep -qF "scheduling.placement" <<<"$err"; then
    echo "memfitd --check-config with '$bad': exit $rc, '$err' (want exit 2 naming scheduling.placement)"
    exit 1
  fi
done
# Careless Slurm settings and sections of the wrong shape stop memfitd naming the field.
slurm='executor: slurm
slurm: {partition: p, shard_memory: 10GiB, shards_per_gpu: 8, gpus: 32'
for case in "$slurm, gpus: 1.5}|slurm.gpus" "$slurm, sbatch_args: [--uid=0]}|slurm.sbatch_args" \
            "$slurm, sbatch_args: ['']}|slurm.sbatch_args" "$slurm, sbatch_args: [--gpus=1]}|slurm.sbatch_args" \
            'slurm: {partition: p}|read only with executor: slurm' 'scheduling: best_fit|scheduling' \
            'limits: 5|limits'; do
  printf '%s\n' "${case%|*}" | sed 's/gpus: 32, gpus: 1.5/gpus: 1.5/' > "$cfg"
  set +e
  err=$("$memfitd" --config "$cfg" --check-config 2>&1 >/dev/null)
  rc=$?
  set -e
  if [ "$rc" -ne 2 ] || ! grep -qF "${case##*|}" <<<"$err"; then
    echo "memfitd --check-config with '${case%|*}': exit $rc, '$err' (want exit 2 naming ${case##*|})"
    exit 1
  fi
done
printf '%s\n' "$slurm, sbatch_args: [--account=ml]}" > "$cfg"
"$memfitd" --config "$cfg" --check-config | grep -qF 'sbatch_args: ["--account=ml"]' || { echo "a good Slurm section was refused"; exit 1; }
out=$("$memfitd" --placement best_fit --check-config)
grep -qF 'placement: best_fit}' <<<"$out" || { echo "--placement best_fit not applied: $out"; exit 1; }
# The stop timeout must outlast the workers' grace period.
grace=$(sed -n 's/^ *cancel_grace_seconds: *\([0-9]*\).*/\1/p' "$repo/deploy/memfitd.yaml")
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)/\1/p' "$repo/deploy/systemd/memfitd.service")
[ "$stop" -gt "$grace" ] || { echo "TimeoutStopSec=$stop must exceed cancel_grace_seconds=$grace"; exit 1; }
echo "deploy files OK"
