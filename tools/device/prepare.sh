#!/usr/bin/env bash
# Build .gpu/, the folder a device run carries (`run(..., carry=[".gpu"])`): the Python packages
# the device image lacks (tools/device/requirements.txt, unpacked for Python 3.12 on x86_64 and
# packed as one xz archive, about 37 MB) and the shared example CT with its TotalSegmentator labels
# (the batch benchmark's scans, train.sh's real training case). The device reaches no registry,
# and a run carries at most 64 MiB with the working tree, so the archive is built here. .gpu/ is
# ignored through .git/info/exclude; run from anywhere, about 2 minutes on 2 cores. SHARED
# overrides the folder of the two example files.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared/data/totalsegmentator}
PYTHON=${PYTHON:-.venv/bin/python}
for f in example_ct.nii.gz example_seg_fast_force_split.nii.gz; do
  [ -f "$SHARED/$f" ] || { echo "prepare.sh: no $SHARED/$f (set SHARED)" >&2; exit 2; }
done
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/data .gpu/build
"$PYTHON" -m pip install --quiet --no-cache-dir --no-deps --only-binary=:all: --target .gpu/build \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -r tools/device/requirements.txt
tar -C .gpu/build -cf - . | xz -9 -T0 > .gpu/site.tar.xz
rm -rf .gpu/build
cp "$SHARED/example_ct.nii.gz" "$SHARED/example_seg_fast_force_split.nii.gz" .gpu/data/
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
gpu=$(du -sb .gpu | cut -f1)
echo "working tree $((tree / 1048576)) MiB + .gpu $((gpu / 1048576)) MiB (a run carries at most 64 MiB)"
[ $((tree + gpu)) -lt $((64 * 1048576)) ] || { echo "prepare.sh: over 64 MiB" >&2; exit 1; }
