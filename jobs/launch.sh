#!/usr/bin/env bash
# Usage: bash jobs/launch.sh CONFIG [--out RUN_DIR | --resume RUN_DIR] [--set KEY=VALUE ...]
# Runs `train` with as many ranks as CONFIG needs (python -m dbmpi validate says how many),
# after making CONFIG's dataset if it is one of data/make.sh's and missing,
# one BLAS thread per rank, through python -m mpi4py so an error on any rank ends the job.
# Overridable: PYTHON (default .venv/bin/python), MPIEXEC (default: the mpiexec beside
# PYTHON, so the MPI its mpi4py was built with), MPIEXEC_ARGS (e.g. "--bind-to core"),
# DBMPI_TRANSPORT=tcp (every message over TCP).
# Exit codes: 0 done, 2 bad input, 3 diverged, 75 preempted (checkpointed; run again with
# --resume RUN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=.venv/bin/python}"
: "${MPIEXEC:=$(dirname "$PYTHON")/mpiexec}"
: "${MPIEXEC_ARGS:=}"
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
# a preemption signal before the launcher runs has no rank to reach: end as preempted (75)
preempted=
trap 'preempted=1' USR1 TERM
config=$1
shift
sets=()            # the --set options, for validate (a path after --out may hold an =)
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --set) sets+=(--set "${args[i + 1]:-}"); i=$((i + 1)) ;;
    --set=*) sets+=(--set "${args[i]#--set=}") ;;
    --out|--resume) i=$((i + 1)) ;;
  esac
done
info=$("$PYTHON" -m dbmpi validate "$config" --no-data "${sets[@]}") || exit $?  # it said why
read -r ranks data <<< "$("$PYTHON" -c 'import json,sys; v = json.loads(sys.argv[1])
print(v["ranks"], v["data_path"])' "$info")"
case "$data" in        # the jobs' own datasets are made where missing (data/make.sh)
  data/digits.h5|data/synth32.h5|data/synth64.h5)
    [ -f "$data" ] || PYTHON="$PYTHON" bash data/make.sh "$(basename "$data" .h5)" ;;
esac
eval "$("$PYTHON" -m dbmpi.mpienv)"   # one BLAS thread a rank; Open MPI's settings; DBMPI_TRANSPORT
if [ -n "$preempted" ]; then
  echo "dbmpi: preempted before the ranks started; nothing to checkpoint" >&2
  exit 75
fi
if [ "$ranks" = "1" ]; then
  exec "$PYTHON" -m dbmpi train "$config" "$@"
fi
# shellcheck disable=SC2086
exec "$MPIEXEC" -n "$ranks" $MPIEXEC_ARGS "$PYTHON" -m mpi4py -m dbmpi train "$config" "$@"
