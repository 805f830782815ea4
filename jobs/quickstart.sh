#!/usr/bin/env bash
# Usage: bash jobs/quickstart.sh [CONFIG] [--set KEY=VALUE ...]
# The main job: installs dbmpi into ./.venv if needed and trains CONFIG (default
# jobs/configs/digits_downpour.toml: Downpour SGD, 5 ranks) into runs/ through jobs/launch.sh, which
# makes CONFIG's dataset if it is missing and data/make.sh knows it (data/digits.h5,
# synth32.h5, synth64.h5); launcher: MPIEXEC, default .venv/bin/mpiexec.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/install.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PY=.venv/bin/python
config="${1:-jobs/configs/digits_downpour.toml}"
[ $# -gt 0 ] && shift
out="runs/$(basename "$config" .toml)-$(date +%Y%m%d-%H%M%S)"
bash jobs/launch.sh "$config" --out "$out" "$@"
$PY -m dbmpi evaluate "$out"
