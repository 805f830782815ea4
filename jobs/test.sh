#!/usr/bin/env bash
# Usage: [DBMPI_MPI=mpich|openmpi] [VENV=DIR] [DBMPI_TRANSPORT=tcp] bash jobs/test.sh [PYTEST ARGS...]
# Installs dbmpi into ./.venv (or VENV) if needed, then runs the test suite (benchmarks
# excluded; `bash jobs/test.sh -m benchmark` runs those).  DBMPI_TRANSPORT=tcp sends every
# message of the multi-rank tests over TCP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/install.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
