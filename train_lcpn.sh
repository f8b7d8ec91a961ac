#!/usr/bin/env bash
# Train every node of an LCPN model, one `lcpn train --node` call per parent node (and one
# `lcpn train --attribute` call per product attribute when the split records attributes).
#
#   ./train_lcpn.sh [DATASET] [-- extra `lcpn train` options]
#
# DATASET is a folder tree of labelled images (default: dataset_example/). The first run creates
# .venv and installs lcpn; `lcpn prepare` runs when the split is missing, made from another dataset,
# or older than the dataset. A file lcpn.toml at the top of DATASET supplies training options;
# otherwise the trainer's defaults apply (EfficientNet-B4). Environment:
#   SPLIT=split_datasets  MODELS=trained_models  where the split and the models go
#   JOBS=1                nodes trained in parallel (round-robin over GPUs when there are several)
#   RAY_ADDRESS=          a Ray cluster (auto, HOST:6379, ray://HOST:10001): one `lcpn train --ray` trains
#                         every node as a Ray task instead of one call per node (JOBS is then unused);
#                         SPLIT, MODELS and the dataset must be on a path that every machine sees
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dataset=$repo/dataset_example
if [ $# -gt 0 ] && [ "$1" != "--" ]; then dataset=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
extra=("$@")
split=${SPLIT:-$repo/split_datasets}
models=${MODELS:-$repo/trained_models}
jobs=${JOBS:-1}
[ -d "$dataset" ] || { echo "train_lcpn.sh: dataset folder '$dataset' not found" >&2; exit 2; }
dataset=$(cd "$dataset" && pwd)
start=$(date +%s)

py=$("$repo/scripts/setup_env.sh" | tail -n 1)
lcpn=$(dirname "$py")/lcpn

recorded=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["split"]["source"])' \
  "$split/hierarchy.json" 2>/dev/null || true)
if [ "$recorded" != "$dataset" ] || [ -n "$(find "$dataset" -newer "$split/hierarchy.json" -print -quit)" ]; then
  echo "== Preparing the split of $dataset into $split"
  "$lcpn" prepare "$dataset" --out "$split"
else
  echo "== The split in $split is up to date"
fi

config=()
[ -f "$dataset/lcpn.toml" ] && config=(--config "$dataset/lcpn.toml")
mapfile -t nodes < <("$py" -c '
import json, sys
from lcpn.hierarchy import Hierarchy
for n in Hierarchy.load(sys.argv[1]).parents:
    print(n or "root")
for name in json.load(open(sys.argv[1], encoding="utf-8")).get("attributes", {}):
    print("attribute:" + name)' "$split/hierarchy.json")
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gpus=${gpus:-0}
what="parent nodes"
[[ " ${nodes[*]} " == *" attribute:"* ]] && what="parent nodes and attributes"
echo "== Training ${#nodes[@]} $what into $models (JOBS=$jobs)"

train_node() {  # $1: node, or attribute:NAME; $2: slot number
  local env=() what=(--node "$1")
  if [ "$gpus" -gt 1 ]; then env=(CUDA_VISIBLE_DEVICES=$(( $2 % gpus ))); fi
  if [[ $1 == attribute:* ]]; then what=(--attribute "${1#attribute:}"); fi
  env "${env[@]}" "$lcpn" train --data "$split" --out "$models" "${what[@]}" "${config[@]}" "${extra[@]}"
}

failed=0
i=0
train_start=$(date +%s)
if [ -n "${RAY_ADDRESS:-}" ]; then
  echo "== One Ray task per node on the cluster at $RAY_ADDRESS"
  "$lcpn" train --data "$split" --out "$models" --ray "$RAY_ADDRESS" "${config[@]}" "${extra[@]}" \
    || { echo "train_lcpn.sh: nodes failed on the Ray cluster (listed above); run it again to resume them" >&2; exit 1; }
else
  for node in "${nodes[@]}"; do
    if [ "$jobs" -le 1 ]; then
      train_node "$node" 0 || failed=$((failed + 1))
    else
      while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=$((failed + 1)); done
      train_node "$node" "$i" > >(sed "s|^|[$node] |") 2>&1 &
    fi
    i=$((i + 1))
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=$((failed + 1)); done
fi

echo
echo "== Per-node summary ($models)"
"$lcpn" summary --models "$models"
echo "== $(( ${#nodes[@]} - failed )) of ${#nodes[@]} $what ready in $models, training took $(( $(date +%s) - train_start )) s"
if [ "$failed" -ne 0 ]; then echo "train_lcpn.sh: $failed node(s) failed; run it again to resume them" >&2; exit 1; fi

echo
echo "== Predicting a few test images"
mapfile -t samples < <("$py" -c '
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="", encoding="utf-8")))
for r in rows[:: max(1, len(rows) // 5)][:5]:
    print(r["path"])' "$split/test.csv")
"$lcpn" predict "${samples[@]}" --models "$models" --top-k 2

echo
echo "== Evaluating the end-to-end test split"
"$lcpn" evaluate "$split" --models "$models" --out "$models/evaluation"
echo "== Finished in $(( $(date +%s) - start )) s"
