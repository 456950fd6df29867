#!/usr/bin/env bash
# One command for a GPU machine (< 8 min on one H100/H200): what the default cluster
# starts, the ~4k-spot tile + embed + train + predict timing, and the HER2ST C2-C4 -> C5
# score (log1p CP10k, panel from the training sections) beside the tuned baselines.
#   bash benchmarks/gpu_check.sh            # from the repository root, ../shared beside it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi -L || echo "nvidia-smi: no NVIDIA driver here (the figures below are CPU figures)"
$PYTHON - <<'PY'
from dflashdeconv.engine.cluster import connect, visible_gpus
from dflashdeconv.histo.devices import gpu_workers
print("visible GPUs:", visible_gpus())
with connect(quiet=True) as client:
    print("default cluster:", len(client.scheduler_info()["workers"]), "workers, GPU workers:",
          gpu_workers(client))
PY
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
time $PYTHON benchmarks/bench_stflow.py --timing --cache "$CACHE"
time $PYTHON benchmarks/bench_stflow.py --splits C5 --seeds 1 --cache "$CACHE"
