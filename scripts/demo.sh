#!/usr/bin/env bash
# Builds and runs the dchag demo on two MPI ranks: scripts/demo.sh [extra CMake arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f examples/demo.cpp ]; then
  echo "demo.sh: examples/demo.cpp is missing, so there is no demo to build" >&2
  exit 1
fi
scripts/install-deps.sh

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
build="${DCHAG_BUILD_DIR:-build}"

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" --parallel "$(nproc)" --target dchag_demo
mpiexec -n 2 --oversubscribe "$build/examples/dchag_demo"
