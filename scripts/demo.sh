#!/usr/bin/env bash
# Installs what is missing, builds one of dchag's examples and runs it at full size
# (examples/README.md): scripts/demo.sh [EXAMPLE] [extra CMake arguments]
#   modes (default)  one image batch through every distributed mode, 2 ranks (examples/demo.cpp)
#   hyperspectral    MAE pretraining on 500-band reflectance cubes, D-CHAG-L on 4 ranks
#   weather          an ERA5-like NetCDF file through D-CHAG-C and exact_flat on 4 ranks,
#                    against PyTorch
#   in_situ          a heat-equation simulation hands its fields to dchag, 4 ranks
set -euo pipefail
cd "$(dirname "$0")/.."

example=modes
case "${1:-}" in
  modes | hyperspectral | weather | in_situ) example=$1; shift ;;
  -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
  "" | -*) ;;
  *) echo "demo.sh: unknown example '$1' (expected modes, hyperspectral, weather or in_situ)" >&2
     exit 2 ;;
esac
if [ ! -f examples/demo.cpp ]; then
  echo "demo.sh: examples/demo.cpp is missing, so there is no demo to build" >&2
  exit 1
fi
scripts/install-deps.sh

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
build="${DCHAG_BUILD_DIR:-build}"
mpi=(mpiexec --oversubscribe)

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "$@"
target=dchag_demo
[ "$example" != modes ] && target=dchag_$example
cmake --build "$build" --parallel "$(nproc)" --target "$target"
case "$example" in
  modes) "${mpi[@]}" -n 2 "$build/examples/dchag_demo" ;;
  hyperspectral)
    "${mpi[@]}" -n 4 "$build/examples/hyperspectral/dchag_hyperspectral" \
      --out "$build/hyperspectral" ;;
  weather)
    /usr/bin/python3 examples/weather/run_weather.py --exe "$build/examples/weather/dchag_weather" \
      --work-dir "$build/weather" ;;
  in_situ)
    "${mpi[@]}" -n 4 "$build/examples/dchag_in_situ" --group 2 --fields 16 --grid 64 \
      --steps 200 --every 20 ;;
esac
