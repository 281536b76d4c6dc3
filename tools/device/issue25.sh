#!/usr/bin/env bash
# Issue #25's GPU figures in one device call of about 9 minutes (points 3 and 4):
#   run(command="bash tools/device/issue25.sh", carry=[".gpu"], timeout_s=600)
# after `bash tools/device/prepare.sh` here. Results under $OUT: env.txt (GPU, packages),
# gpu_pipeline.{txt,json} (Predictor.predict against the network, 512 x 512 x 300 CT),
# moe_block.{txt,json} (top-1 against the dense mixture on the GPU), batch_gpu.{txt,json} (scans
# per hour: one process per scan, m4oe batch, m4oe batch --workers 2). Each step has its own
# time limit, so one that fails or hangs leaves the others' results.
# DEVICE=cpu SMALL=1 tries the script out on a machine without a GPU (tiny sizes, no figures).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/m4oe-issue25}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
source tools/device/common.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  echo "CPU cores: $(nproc)"
  "$PY" -c "import sys, torch, timm, SimpleITK, monai, dask, distributed; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__, 'SimpleITK', SimpleITK.Version_VersionString(), 'monai', monai.__version__, 'dask', dask.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ "${SMALL:-0}" = 1 ]; then
  slices=(--slices 8 --repeats 1); blocks=(--repeats 1 --warmup 0); cases=(--cases 2 --cli-cases 1)
else
  slices=(); blocks=(--repeats 5); cases=(--cases 20 --cli-cases 8)
fi
timeout 240 "$PY" benchmarks/gpu_pipeline.py --device "$DEVICE" "${slices[@]}" --json "$OUT/gpu_pipeline.json" 2>&1 | tee "$OUT/gpu_pipeline.txt"
timeout 60 "$PY" benchmarks/moe_block.py --device "$DEVICE" "${blocks[@]}" --json "$OUT/moe_block.json" 2>&1 | tee "$OUT/moe_block.txt"
timeout 290 "$PY" benchmarks/batch.py --data .gpu/data "${cases[@]}" --device "$DEVICE" --tta 1 --workers 2 \
  --json "$OUT/batch_gpu.json" 2>&1 | tee "$OUT/batch_gpu.txt"
