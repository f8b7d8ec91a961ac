#!/usr/bin/env bash
# GPU measurements for docs/benchmarks.md: EfficientNet-B4 fine-tuning speed at 380 px, features-mode
# training (the embedding pass and the heads, with the device's default batch and workers), and the
# batched cascade's throughput on CUDA in finetune (B4, Lite0) and features (Lite2) mode. Every step
# prints how busy the GPU was (nvidia-smi sampled every 200 ms) and how long it took.
#
#   scripts/gpu_benchmark.sh DATA [WORKDIR]
#
# DATA is a labelled folder tree; lcpn must be importable (pip install -e . or PYTHONPATH).
# B4 trains from random weights unless its ImageNet checkpoint is in the torch hub cache: the
# figures are about speed, not accuracy.
set -euo pipefail
data=${1:?usage: scripts/gpu_benchmark.sh DATA [WORKDIR]}
work=${2:-/tmp/lcpn-gpu}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi -L
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
mkdir -p "$work"

busy() {  # run "$@", sampling the GPU's utilisation meanwhile; then print its mean and the wall time
  local log rc=0 start sampler
  log=$(mktemp)
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$log" &
  sampler=$!
  start=$(date +%s%N)
  "$@" || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  awk -v ms=$(( ($(date +%s%N) - start) / 1000000 )) -v what="$1 ${2:-} ${3:-}" \
    '{ s += $1; n++ } END { printf "   [%s] GPU busy %.0f%% (mean of %d samples), %.1f s\n", what, n ? s / n : 0, n, ms / 1000 }' \
    "$log" >&2
  rm -f "$log"
  return "$rc"
}
"$py" -m lcpn prepare "$data" --out "$work/split" | tail -12
pretrained=--no-pretrained
"$py" -c "from lcpn.backbones import hub_checkpoint as h; import sys; sys.exit(not h('efficientnet-b4').is_file())" \
  && pretrained=--pretrained
busy "$py" -m lcpn train --data "$work/split" --out "$work/b4" --backbone efficientnet-b4 $pretrained --epochs 2 \
  --batch-size 32 | grep -E "classes|ready"
"$py" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
history = json.load(open(f"{work}/b4/parent/node.json"))["history"]
n = sum(1 for _ in open(f"{work}/split/parent/train.csv")) - 1
for e in history:
    print(f"B4 root epoch {e['epoch']}: {e['seconds']:.1f} s for {n} train images (val pass included) "
          f"-> {n / e['seconds']:.1f} img/s")
PY
busy "$py" -m lcpn train --data "$work/split" --out "$work/lite" --backbone efficientnet-lite0 --epochs 2 \
  --batch-size 64 | grep -E "classes|ready"
# features mode with its defaults (Lite2, the device's embedding batch and decoding workers), cache cold
busy "$py" -m lcpn train --data "$work/split" --out "$work/feat" --mode features --cache "$work/cache" \
  | grep -E "classes|ready"
busy "$py" - "$work" <<'PY'
import csv, sys, time
from lcpn.cascade import Cascade
work = sys.argv[1]
paths = [r["path"] for r in csv.DictReader(open(f"{work}/split/images.csv"))][:2048]
for name in ("b4", "lite", "feat"):
    for precision in ("fp32", "bf16"):
        cascade = Cascade.load(f"{work}/{name}", "cuda", precision)
        list(cascade.predict(paths[:256], 256))
        start = time.perf_counter()
        n = sum(1 for _ in cascade.predict(paths, 256))
        print(f"cascade {name} {precision}: {n / (time.perf_counter() - start):.0f} img/s over {n} images "
              "(batch 256, default decoding workers, decoding included)")
PY
busy "$py" -m lcpn evaluate "$work/split" --models "$work/feat" --out "$work/evaluation" --device cuda | head -12
