#!/usr/bin/env bash
# Usage: bash jobs/install.sh
# Creates ./.venv (if missing) and installs dbmpi into it with MPI from PyPI (mpi4py + the
# mpich wheel), building the Cython kernels.  Safe to run again: it reinstalls only when
# pyproject.toml, setup.py or the kernels changed.  Override the interpreter with PYTHON=...
# and the venv with VENV=...; set DBMPI_NO_MPICH=1 on a cluster whose mpi4py is built on the
# site MPI (see README, "On a cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=python3}"
: "${VENV:=.venv}"
extras="test,study"
[ "${DBMPI_NO_MPICH:-0}" = "1" ] || extras="mpich,$extras"
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
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[$extras]"  # setuptools beta notices
echo "$want" > "$stamp"
echo "installed: $("$VENV/bin/python" -c 'import dbmpi, mpi4py; print("dbmpi", dbmpi.__version__, "mpi4py", mpi4py.__version__)')" >&2
