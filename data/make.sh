#!/usr/bin/env bash
# Usage: bash data/make.sh [--count N] NAME...     NAME: digits | synth32 | synth64 | all
# Makes the HDF5 datasets that the configs in jobs/ read, as data/NAME.h5, skipping those
# that exist (delete one to remake it):
#   digits   the real 8x8 digits (1797 images, from scikit-learn's package), 10 classes
#   synth32  synthetic digits drawn at 32x32 (jobs/configs/speech_fc.toml), 20000 training images
#   synth64  synthetic digits drawn at 64x64 (jobs/configs/synth64_lc.toml), 20000 training images
# --count N: training images of the synthetic sets (test: a fifth, at least 100).
# Overridable: PYTHON (default .venv/bin/python, as bash jobs/install.sh makes it), DATA_DIR
# (default data).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=.venv/bin/python}"
: "${DATA_DIR:=data}"
count=20000
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --count) [ $# -ge 2 ] || { echo "data/make.sh: --count needs a number" >&2; exit 2; }
             count=$2; shift 2 ;;
    all) names+=(digits synth32 synth64); shift ;;
    digits|synth32|synth64) names+=("$1"); shift ;;
    *) echo "data/make.sh: unknown dataset '$1'; use digits, synth32, synth64 or all" >&2
       sed -n '2,10p' "$0" >&2; exit 2 ;;
  esac
done
[ ${#names[@]} -gt 0 ] || { sed -n '2,10p' "$0"; exit 2; }
for name in "${names[@]}"; do
  out="$DATA_DIR/$name.h5"
  if [ -f "$out" ] && [ "$name" = digits ]; then
    echo "$out exists" >&2
    continue
  elif [ -f "$out" ]; then    # a set of another size under the name would stand in silently
    have=$("$PYTHON" -c 'import sys; from dbmpi.data import check_file
print(check_file(sys.argv[1], scan=False)["train"])' "$out" 2>/dev/null) || have="unreadable"
    if [ "$have" = "$count" ]; then echo "$out exists ($have training images)" >&2
    else echo "$out exists ($have training images, not $count): delete it to remake it" >&2
    fi
    continue
  fi
  case "$name" in
    digits) "$PYTHON" -m dbmpi data digits --out "$out" ;;
    synth*) "$PYTHON" -m dbmpi data synthetic --size "${name#synth}" --count "$count" --out "$out" ;;
  esac
done
