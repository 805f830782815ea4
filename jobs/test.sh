#!/usr/bin/env bash
# Usage: bash jobs/test.sh [PYTEST ARGS...]
# Installs dbmpi into ./.venv if needed, then runs the test suite (benchmarks excluded;
# `bash jobs/test.sh -m benchmark` runs those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/install.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
