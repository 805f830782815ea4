#!/usr/bin/env bash
# The body of jobs/slurm/slurm_srun.sbatch and jobs/slurm/slurm_mpirun.sbatch (run inside an allocation):
#   bash jobs/slurm/slurm_job.sh srun|mpirun CONFIG [RUN_DIR] [--set KEY=VALUE ...]
# Starts `train` through jobs/launch.sh with srun or the MPI's mpirun as the launcher, or,
# when RUN_DIR holds a checkpoint (a requeued job), resumes from it.  USR1 or TERM to this
# script (Slurm's --signal=B:USR1@N before the time limit) is passed on to every rank as
# USR1: the job checkpoints and exits 75, and this script requeues it.  Any other exit code
# ends the job with it (a dead rank is never requeued in a loop).
# Overridable: PYTHON (default .venv/bin/python), SRUN_ARGS (default --mpi=pmi2 for MPICH,
# --mpi=pmix for Open MPI, plus --kill-on-bad-exit=1), MPIRUN (default: the mpiexec beside
# PYTHON), MPIRUN_ARGS.
set -euo pipefail
launcher=${1:?usage: bash jobs/slurm/slurm_job.sh srun|mpirun CONFIG [RUN_DIR] [--set KEY=VALUE ...]}
config=${2:?usage: bash jobs/slurm/slurm_job.sh srun|mpirun CONFIG [RUN_DIR] [--set KEY=VALUE ...]}
shift 2
run=runs/$(basename "$config" .toml)-${SLURM_JOB_ID:-manual}
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then run=$1; shift; fi
: "${PYTHON:=.venv/bin/python}"
[ -n "${SLURM_NTASKS:-}" ] || { echo "dbmpi: $0 runs inside a Slurm allocation (sbatch)" >&2; exit 2; }
case "$launcher" in
  srun)
    : "${SRUN_ARGS:=--mpi=$("$PYTHON" -m dbmpi.mpienv --srun-mpi) --kill-on-bad-exit=1}"
    export MPIEXEC=srun MPIEXEC_ARGS="$SRUN_ARGS" ;;
  mpirun)
    export MPIEXEC="${MPIRUN:-$(dirname "$PYTHON")/mpiexec}" MPIEXEC_ARGS="${MPIRUN_ARGS:-}" ;;
  *) echo "dbmpi: launcher must be srun or mpirun, not $launcher" >&2; exit 2 ;;
esac
export PYTHON
if [ -f "$run/checkpoint.h5" ]; then
  echo "dbmpi: resuming from $run (job ${SLURM_JOB_ID:-}, restart ${SLURM_RESTART_COUNT:-0})" >&2
  bash jobs/launch.sh "$run/config.toml" --resume "$run" &
else
  bash jobs/launch.sh "$config" --out "$run" "$@" &
fi
step=$!
# launch.sh execs the launcher, so $step is srun or mpiexec: both pass USR1 to every rank.
# A launcher still starting its ranks may drop it, so it is sent again until the ranks end.
trap 'echo "dbmpi: $(date +%T) preemption signal: passed on to the ranks" >&2
      kill -USR1 "$step" 2>/dev/null || true' USR1 TERM
rc=0
wait "$step" || rc=$?                 # returns early when a signal comes
if kill -0 "$step" 2>/dev/null; then
  while kill -0 "$step" 2>/dev/null; do sleep 2; kill -USR1 "$step" 2>/dev/null || true; done
  rc=0
  wait "$step" || rc=$?
fi
if [ "$rc" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "dbmpi: preempted; checkpoint in $run; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
