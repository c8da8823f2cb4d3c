#!/usr/bin/env bash
# Builds dchag and runs its whole test suite: scripts/test.sh [extra CMake arguments]
# e.g. scripts/test.sh -DDCHAG_ENABLE_MPI=OFF. Build directory: $DCHAG_BUILD_DIR (default build).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Containers run as root, which Open MPI refuses unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
build="${DCHAG_BUILD_DIR:-build}"

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" --parallel "$(nproc)"
cd "$build"
ctest --output-on-failure
