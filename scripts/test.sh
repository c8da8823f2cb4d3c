#!/usr/bin/env bash
# Builds dchag and runs its whole test suite in three legs:
#   1. release: every test, benchmark and example, Release build in $DCHAG_BUILD_DIR (default build)
#   2. sanitize: the test suite again under ASan and UBSan (scripts/sanitize.sh)
#   3. fuzz: the safetensors reader and load_weights under libFuzzer for 60 s (scripts/fuzz.sh)
# scripts/test.sh [extra CMake arguments], e.g. scripts/test.sh -DDCHAG_ENABLE_MPI=OFF; the
# arguments go to the release and sanitize builds.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Containers run as root, which Open MPI refuses unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
build="${DCHAG_BUILD_DIR:-build}"

leg() {
  echo "test.sh: $1 leg passed in $((SECONDS - start)) s"
  start=$SECONDS
}
start=$SECONDS

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" --parallel "$(nproc)"
(cd "$build" && ctest --output-on-failure)
leg release

scripts/sanitize.sh "$@"
leg sanitize

scripts/fuzz.sh 60
leg fuzz
