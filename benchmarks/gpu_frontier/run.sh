#!/usr/bin/env bash
# Issue 23 on one GPU: configs/minilm_agreement.toml (or the config given as $2; the
# 22.7M-parameter encoder shape, masks and patching over all 9,288 heads and neurons) with
# nvidia-smi sampled every second. Writes under $1: smi.csv, run.log, and tables.tgz (the
# experiment's results.csv, summary.csv, patching.csv, frontier.csv, manifest.json,
# report.html and search/). RUN_LIMIT_S bounds the run (it resumes when called again).
set -uo pipefail
out=${1:?output folder}
config=${2:-configs/minilm_agreement.toml}
run=/tmp/gpu_frontier/$(basename "$config" .toml)
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
cd "$root"
[ -d checkpoints/minilm_shape ] || python3 scripts/make_hf_shape_checkpoints.py --out checkpoints \
  --shapes minilm_shape > "$out/build.log" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 \
  > "$out/smi.csv" &
smi=$!
PYTHONUNBUFFERED=1 timeout "${RUN_LIMIT_S:-500}" python3 -m subroutine_circuits run \
  "$config" --out "$run" --device cuda > "$out/run.log" 2>&1
echo "EXIT $?" >> "$out/run.log"
kill "$smi"
(cd "$run" && tar czf "$out/tables.tgz" --ignore-failed-read results.csv summary.csv \
  patching.csv frontier.csv manifest.json report.html search 2>/dev/null)
true
