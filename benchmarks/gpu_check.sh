#!/usr/bin/env bash
# One command for a GPU machine (< 8 min on one H100/H200): what the default cluster
# starts, the ~4k-spot tile + embed + train + predict timing, and the HER2ST C2-C4 -> C5
# score (log1p CP10k, panel from the training sections) beside the tuned baselines.
#   bash benchmarks/gpu_check.sh            # from the repository root, ../shared beside it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi -L || echo "nvidia-smi: no NVIDIA driver here (the figures below are CPU figures)"
$PYTHON benchmarks/bench_stflow.py --cluster
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
time $PYTHON benchmarks/bench_stflow.py --timing --cache "$CACHE"
time $PYTHON benchmarks/bench_stflow.py --splits C5 --seeds 1 --cache "$CACHE"
