# Sourced by the device scripts: unpack the packages prepare.sh packed into .gpu/ and put them, the
# engine and the training package on PYTHONPATH. Needs PY (the device's python3) set.
mkdir -p /tmp/m4oe-site
# Python's tarfile, not tar: the image's tar may lack xz.
"$PY" -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('/tmp/m4oe-site', filter='data')" ||
  { echo "$0: cannot unpack .gpu/site.tar.xz (run tools/device/prepare.sh, carry .gpu)" >&2; exit 2; }
export PYTHONPATH=/tmp/m4oe-site:$PWD/M4oESegmentation:$PWD/training PYTHONUNBUFFERED=1
