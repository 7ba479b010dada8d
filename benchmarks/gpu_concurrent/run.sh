#!/usr/bin/env bash
# Issue 21 on one GPU: three experiments at once, 2 worker processes each (6 processes share the
# card), nvidia-smi sampled every second; then the forced out-of-memory check. Writes under $1:
# smi.csv (memory used and utilisation per second), peaks.json (each job's peak GPU memory from
# the manifests), runs.log (the three logs), oom.log (benchmarks/gpu_memory_check.py).
# Needs the minilm_shape folder: python scripts/make_hf_shape_checkpoints.py --out checkpoints
# --shapes minilm_shape
set -uo pipefail
out=${1:?output folder}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out" /tmp/gpuc
nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits -l 1 > "$out/smi.csv" &
smi=$!
limit=${RUN_LIMIT_S:-420}
pids=()
for name in small_preset minilm_encoder demo; do
  if [ "$name" = demo ]; then cfg="$root/configs/agreement.toml"; else cfg="$here/$name.toml"; fi
  (cd "$root" && PYTHONUNBUFFERED=1 timeout "$limit" python3 -m subroutine_circuits run "$cfg" \
     --out "/tmp/gpuc/$name" --device cuda --workers 2 > "/tmp/gpuc/$name.log" 2>&1; echo "EXIT $name $?" >> "/tmp/gpuc/$name.log") &
  pids+=($!)
done
wait "${pids[@]}"
kill "$smi"
for name in small_preset minilm_encoder demo; do echo "=== $name"; tail -n 40 "/tmp/gpuc/$name.log"; done > "$out/runs.log"
python3 - "$out/peaks.json" <<'PY'
import json, sys, pathlib
# each job's peak GPU memory, as the runner writes it into manifest.json (None: not finished)
peaks = {}
for name in ("small_preset", "minilm_encoder", "demo"):
    man = pathlib.Path("/tmp/gpuc") / name / "manifest.json"
    peaks[name] = json.loads(man.read_text()).get("peak_gpu_memory_gb") if man.exists() else None
json.dump(peaks, open(sys.argv[1], "w"), indent=1)
PY
(cd "$root" && timeout 110 python3 benchmarks/gpu_memory_check.py > "$out/oom.log" 2>&1; echo "EXIT $?" >> "$out/oom.log")
