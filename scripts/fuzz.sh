#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors reader and load_weights (tests/fuzz) with
# clang++-14, ASan and UBSan, and fuzzes it for a bounded time:
#   scripts/fuzz.sh [seconds] [libFuzzer flags...]     (default 60 seconds)
# e.g. scripts/fuzz.sh 3600 -fork=2. Build directory: $DCHAG_FUZZ_BUILD_DIR (default build-fuzz).
# Seeds: tests/golden/*.safetensors, tests/checkpoint/*.safetensors (F64, size-1 dimensions),
# flat_all with channel names, tests/fuzz/regressions/*. The corpus grows in <build>/corpus (kept
# between runs); a finding is written to <build>/artifacts/ (crash-*, leak-*, timeout-*, oom-*)
# and the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi

scripts/install-deps.sh

build="${DCHAG_FUZZ_BUILD_DIR:-build-fuzz}"
# Kokkos and Kokkos Kernels from Debian are built with g++; clang-built code links against them
# (same C++ ABI). MPI stays off: load_weights needs none, and Open MPI's leaks at MPI_Init would
# force LeakSanitizer off.
cxx="${DCHAG_FUZZ_CXX:-clang++-14}"
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_BUILD_TYPE=Debug -DDCHAG_ENABLE_FUZZING=ON -DDCHAG_ENABLE_MPI=OFF \
  -DDCHAG_ENABLE_TESTS=OFF -DDCHAG_ENABLE_BENCHMARKS=OFF -DDCHAG_ENABLE_EXAMPLES=OFF
cmake --build "$build" --target fuzz_safetensors --parallel "$(nproc)"

mkdir -p "$build/corpus" "$build/artifacts"
rm -rf "$build/seeds"
mkdir "$build/seeds"
cp tests/golden/*.safetensors tests/checkpoint/*.safetensors "$build/seeds/"
if [ -d tests/fuzz/regressions ]; then
  find tests/fuzz/regressions -type f -exec cp {} "$build/seeds/" \;
fi
# No golden names its channels; one seed that does lets loading by name start from a file that
# passes every check (the target's model calls its channels a..f).
python3 - "$build/seeds/flat_all_channels.safetensors" <<'PY'
import json, struct, sys
data = open("tests/golden/flat_all.safetensors", "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
header.setdefault("__metadata__", {})["channels"] = "f,e,d,c,b,a"
text = json.dumps(header, separators=(",", ":"))
text += " " * (-len(text) % 8)
with open(sys.argv[1], "wb") as out:
    out.write(struct.pack("<Q", len(text)) + text.encode() + data[8 + n:])
PY

# Reports name files and lines only through llvm-symbolizer (package llvm-14, beside clang).
symbolizer="$(dirname "$(readlink -f "$(command -v "$cxx")")")/llvm-symbolizer"
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && [ -x "$symbolizer" ]; then
  export ASAN_SYMBOLIZER_PATH="$symbolizer"
fi
export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

# New inputs go to the first directory only; the seeds stay as they are.
"$build/tests/fuzz/fuzz_safetensors" -max_total_time="$seconds" -timeout=30 -print_funcs=0 \
  -print_final_stats=1 -dict=tests/fuzz/safetensors.dict -artifact_prefix="$build/artifacts/" \
  "$@" "$build/corpus" "$build/seeds"
