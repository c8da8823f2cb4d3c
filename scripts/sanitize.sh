#!/usr/bin/env bash
# Builds the test suite with AddressSanitizer and UndefinedBehaviorSanitizer (preset
# debug-sanitize: -O1, line tables only) and runs all of it: scripts/sanitize.sh [extra CMake
# arguments].
# scripts/test.sh runs it after the release suite. Build directory: build-debug-sanitize.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Containers run as root, which Open MPI refuses unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# The benchmarks register no tests; building them sanitized would only cost time.
cmake --preset debug-sanitize -DDCHAG_ENABLE_BENCHMARKS=OFF "$@"
cmake --build --preset debug-sanitize --parallel "$(nproc)"
ctest --preset debug-sanitize --parallel "$(nproc)"
