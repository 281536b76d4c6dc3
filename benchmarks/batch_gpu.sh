#!/usr/bin/env bash
# Cohort throughput on a CUDA machine (issue #25 point 4): benchmarks/batch.py's three modes (one
# `m4oe segment` process per scan, `m4oe batch`, `m4oe batch --workers 2`) on the GPU, one run
# meant to finish in under 5 minutes. Needs the project set up (`make setup`: .venv with the CUDA
# build of torch and Dask) and ../shared/data/totalsegmentator/example_ct.nii.gz.
#
# 20 real-size CTs (0.8 x 0.8 x 1.5 mm, about 27 M voxels each) for both batch modes; the per-scan
# CLI, whose start-up (5-8 s per process) dominates, runs on the first 8 of them only: its rate per
# scan, not a 20-scan run, to stay within the time. One test-time pass (--tta 1), as on the CPU.
# DATA overrides the folder that holds example_ct.nii.gz (batch.py's --data).
# Results: $OUT/batch_gpu.txt and $OUT/batch_gpu.json, with the GPU's name in $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/m4oe-batch-gpu}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | sed 's/^/CPU cores: /' | tee -a "$OUT/gpu.txt"
timeout 290 "$PYTHON" benchmarks/batch.py ${DATA:+--data "$DATA"} --cases "${CASES:-20}" --cli-cases "${CLI_CASES:-8}" \
  --device cuda --tta "${TTA:-1}" --workers 2 --json "$OUT/batch_gpu.json" | tee "$OUT/batch_gpu.txt"
