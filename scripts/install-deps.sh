#!/usr/bin/env bash
# Installs the Debian 12 packages dchag needs to build and test, only those that are missing.
#   scripts/install-deps.sh   build, test, benchmark, the examples; PyTorch for regenerating
#                             goldens, the checkpoint round trip and the comparison benches
# Needs root only when something is missing.
set -euo pipefail

packages=(cmake g++ make ccache
          libtrilinos-kokkos-dev libtrilinos-kokkos-kernels-dev
          libopenmpi-dev openmpi-bin catch2 libbenchmark-dev libopenblas-dev python3-numpy
          python3-torch
          # examples: NetCDF-C and netCDF4-python (weather), gnuplot (loss curves as PNG)
          libnetcdf-dev python3-netcdf4 gnuplot-nox
          # scripts/fuzz.sh: clang, libclang_rt.fuzzer and the sanitizer runtimes, llvm-symbolizer
          clang-14 libclang-rt-14-dev llvm-14)
for arg in "$@"; do
  case "$arg" in
    --torch) ;;  # PyTorch is always installed now; accepted so older commands still work
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: missing packages: ${missing[*]}" >&2
  echo "install-deps.sh: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
