#!/usr/bin/env bash
# Train one config on the device machine's GPU and bring its model back, in one call:
#   run(command="bash tools/device/train.sh training/configs/X.toml --set stages.0.epochs=20",
#       carry=[".gpu"], timeout_s=600)
# after `bash tools/device/prepare.sh` here. The data the repository's configs name are made there:
# the phantoms of training/README.md ("The embedded demonstration model": ct, t1, t2 with seed 1,
# ct_more with seed 2; 24 cases each at 128 px, seconds on 16 cores) and the real CT converted from
# the two TotalSegmentator files prepare.sh carries. Arguments after the config go to `m4oe train`
# (--set device=cuda and loader_workers=14 come first, so later --set wins). The training stops at
# TRAIN_SECONDS (default 480) so the model, the card and the run's log still come back under $OUT
# (model.json, model.safetensors, train_log.csv, train.log); score the model here with
# benchmarks/real_accuracy.py --model and benchmarks/phantom_accuracy.py --model.
# DEVICE=cpu tries it out on a machine without a GPU (use --set to shorten it).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:?usage: train.sh CONFIG [m4oe train arguments]}
shift
OUT=${OUT:-/tmp/m4oe-train}
PY=${PY:-python3}
mkdir -p "$OUT"
source tools/device/common.sh
phantoms() { [ -d "data/phantom/$1" ] || "$PY" -m m4oe.cli phantom "data/phantom/$1" --modality "$2" --cases 24 --seed "$3" --max-size 128; }
phantoms ct ct 1 & phantoms t1 t1 1 & phantoms t2 t2 1 & phantoms ct_more ct 2 & wait
[ -d data/real/example_ct ] || "$PY" -m m4oe_training.converters totalsegmentator data/real/example_ct --modality ct \
  --image .gpu/data/example_ct.nii.gz --labels .gpu/data/example_seg_fast_force_split.nii.gz --case example_ct
run_dir=$("$PY" - "$CONFIG" "$@" <<'PYTHON'
import sys
from m4oe_training.config import load_config
args = sys.argv[2:]
overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
print(load_config(sys.argv[1], overrides)[0].output_dir)
PYTHON
)
rm -rf "$run_dir/model"  # only this run's export comes back
status=0
timeout --signal INT "${TRAIN_SECONDS:-480}" "$PY" -m m4oe.cli train "$CONFIG" --set device="${DEVICE:-cuda}" \
  --set loader_workers="${WORKERS:-14}" "$@" 2>&1 | tee "$OUT/train.log" || status=$?
cp "$run_dir/train_log.csv" "$OUT/" 2>/dev/null || true
if [ -f "$run_dir/model/model.safetensors" ]; then
  cp "$run_dir/model/model.json" "$run_dir/model/model.safetensors" "$OUT/"
else
  echo "train.sh: no exported model in $run_dir/model (stopped before the end? shorten the run with --set)" >&2
  exit 1
fi
exit "$status"
