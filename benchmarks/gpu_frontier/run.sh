#!/usr/bin/env bash
# Issue 23 on one GPU: configs/minilm_agreement.toml (the 22.7M-parameter encoder shape, masks
# and patching over all 9,288 heads and neurons) with nvidia-smi sampled every second. Writes
# under $1: smi.csv, run.log, and the experiment's tables (results.csv, summary.csv,
# patching.csv, frontier.csv, manifest.json, report.html). RUN_LIMIT_S bounds the run (it
# resumes when called again on the same folder).
set -uo pipefail
out=${1:?output folder}
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
cd "$root"
[ -d checkpoints/minilm_shape ] || python3 scripts/make_hf_shape_checkpoints.py --out checkpoints \
  --shapes minilm_shape > "$out/build.log" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 \
  > "$out/smi.csv" &
smi=$!
PYTHONUNBUFFERED=1 timeout "${RUN_LIMIT_S:-500}" python3 -m subroutine_circuits run \
  configs/minilm_agreement.toml --out /tmp/minilm --device cuda > "$out/run.log" 2>&1
echo "EXIT $?" >> "$out/run.log"
kill "$smi"
for f in results.csv summary.csv patching.csv frontier.csv manifest.json report.html; do
  [ -f "/tmp/minilm/$f" ] && cp "/tmp/minilm/$f" "$out/"
done
mkdir -p "$out/rows" && cp -r /tmp/minilm/search "$out/rows/" 2>/dev/null
true
