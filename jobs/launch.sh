#!/usr/bin/env bash
# Usage: bash jobs/launch.sh CONFIG [--out RUN_DIR | --resume RUN_DIR] [--set KEY=VALUE ...]
# Runs `train` with as many ranks as CONFIG needs (python -m dbmpi validate says how many),
# one BLAS thread per rank, through python -m mpi4py so an error on any rank ends the job.
# Overridable: MPIEXEC (default .venv/bin/mpiexec), MPIEXEC_ARGS (e.g. "--bind-to core"),
# PYTHON (default .venv/bin/python).  Exit codes: 0 done, 2 bad input, 3 diverged,
# 75 preempted (checkpointed; run again with --resume RUN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=.venv/bin/python}"
: "${MPIEXEC:=.venv/bin/mpiexec}"
: "${MPIEXEC_ARGS:=}"
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
config=$1
shift
sets=()
for a in "$@"; do case "$a" in --set|--out|--resume|--quiet) ;; *=*) sets+=(--set "$a") ;; esac; done
ranks=$("$PYTHON" -m dbmpi validate "$config" --no-data "${sets[@]}" \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["ranks"])')
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ "$ranks" = "1" ]; then
  exec "$PYTHON" -m dbmpi train "$config" "$@"
fi
# shellcheck disable=SC2086
exec "$MPIEXEC" -n "$ranks" $MPIEXEC_ARGS "$PYTHON" -m mpi4py -m dbmpi train "$config" "$@"
