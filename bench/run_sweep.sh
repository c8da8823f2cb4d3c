#!/usr/bin/env bash
# Runs the memory and throughput study: dchag_sweep --preset paper at P = 1, 2 and 4 ranks
# (oversubscribed where the machine has fewer cores), one thread per rank, then draws the figures.
#
#   bench/run_sweep.sh BUILD_DIR OUT_DIR [dchag_sweep options...]
#
# BUILD_DIR holds bench/dchag_sweep (cmake --build BUILD_DIR --target dchag_sweep); this script
# builds nothing. Extra options go to every dchag_sweep call after --preset paper (e.g. --reps 3,
# --C 64,1024). SWEEP_RANKS (default "1 2 4") picks the rank counts; MPIEXEC (default mpiexec)
# the launcher.
#
# Writes OUT_DIR/sweep.jsonl (every run, one JSON line each), OUT_DIR/sweep_P{P}.{jsonl,log},
# OUT_DIR/run_info.txt (date, machine, load, command lines), then bench/plot_sweep.sh's figures
# and tables in OUT_DIR.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_sweep.sh: $*" >&2; exit 1; }

[[ $# -ge 1 ]] && [[ $1 == -h || $1 == --help ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
build_dir=$1 out_dir=$2
shift 2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sweep=$build_dir/bench/dchag_sweep
[[ -x $sweep ]] || die "$sweep not found; build it first:
  cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release -DDCHAG_ENABLE_BENCHMARKS=ON
  cmake --build $build_dir --target dchag_sweep"
MPIEXEC=${MPIEXEC:-mpiexec}
command -v "$MPIEXEC" >/dev/null || die "$MPIEXEC not found (set MPIEXEC)"
ranks=${SWEEP_RANKS:-1 2 4}

# One thread per rank; Open MPI may run as root in containers and oversubscribe the cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
oversubscribe=()
"$MPIEXEC" --version 2>&1 | grep -qiE "open ?mpi|openrte" && oversubscribe=(--oversubscribe)

mkdir -p "$out_dir"
info=$out_dir/run_info.txt
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm), $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
  echo "git: $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
} >"$info"

start=$SECONDS
: >"$out_dir/sweep.jsonl"
for P in $ranks; do
  cmd=("$MPIEXEC" -n "$P" "${oversubscribe[@]}" "$sweep" --preset paper "$@")
  echo "run_sweep.sh: ${cmd[*]}" >&2
  echo "command P=$P: ${cmd[*]}" >>"$info"
  t0=$SECONDS
  "${cmd[@]}" >"$out_dir/sweep_P$P.jsonl" 2> >(tee "$out_dir/sweep_P$P.log" >&2)
  echo "P=$P took $((SECONDS - t0)) s, load after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" >>"$info"
  cat "$out_dir/sweep_P$P.jsonl" >>"$out_dir/sweep.jsonl"
done
echo "total: $((SECONDS - start)) s" >>"$info"
cat "$info" >&2

"$here/plot_sweep.sh" "$out_dir/sweep.jsonl" "$out_dir"
