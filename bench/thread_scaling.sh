#!/usr/bin/env bash
# Times the flat pooled front end (forward, forward+backward) of a Kokkos OpenMP build at several
# thread counts, interleaved round by round so that a noisy machine slows every count alike, and
# prints per count the median and the best of the rounds, with the speedups over 1 thread.
#
#   bench/thread_scaling.sh BUILD_DIR [--threads "1 2"] [--rounds 5] [--config B:1,C:500]
#
# BUILD_DIR holds bench/dchag_bench built against a Kokkos with OpenMP (the default execution
# space); this script builds nothing. OpenBLAS runs one thread per call (dchag spreads the GEMMs
# of a batch over Kokkos' threads), threads are bound one per core.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "thread_scaling.sh: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
build_dir=$1
shift
threads="1 2" rounds=5 config="B:1,C:500"
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --threads) threads=$2 ;; --rounds) rounds=$2 ;; --config) config=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds is '$rounds', expected a positive integer"
for t in $threads; do
  [[ $t =~ ^[1-9][0-9]*$ ]] || die "--threads holds '$t', expected positive integers"
done
bench_bin=$build_dir/bench/dchag_bench
[[ -x $bench_bin ]] || die "$bench_bin not found; build it first (cmake --build $build_dir --target dchag_bench)"
PYTHON=${PYTHON:-/usr/bin/python3}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "config $config, threads $threads, $rounds rounds, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for ((r = 0; r < rounds; ++r)); do
  for t in $threads; do
    OMP_NUM_THREADS=$t OMP_PROC_BIND=spread OMP_PLACES=cores OPENBLAS_NUM_THREADS=1 \
      "$bench_bin" --dchag_config="$config" --benchmark_filter='^FlatFrontEnd/.*/pooled' \
      --benchmark_min_time=0.5 --benchmark_format=json --benchmark_out_format=json \
      --benchmark_out="$out/t$t.r$r.json" >/dev/null 2>&1 || die "dchag_bench failed at $t threads"
  done
done

"$PYTHON" - "$out" $threads <<'EOF'
import json, glob, os, statistics, sys
out, threads = sys.argv[1], [int(t) for t in sys.argv[2:]]
times = {}  # (pass, threads) -> [ms]
for t in threads:
    for path in glob.glob(os.path.join(out, f"t{t}.r*.json")):
        with open(path) as f:
            data = json.load(f)
        if data["context"].get("kokkos_concurrency") != str(t):
            sys.exit(f"thread_scaling.sh: {path}: Kokkos ran {data['context'].get('kokkos_concurrency')}"
                     f" threads, expected {t} (is BUILD_DIR an OpenMP build?)")
        for b in data["benchmarks"]:
            name = b["name"].split("/")[1]
            unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
            times.setdefault((name, t), []).append(b["real_time"] * unit)
print("| pass | threads | median ms | best ms | speedup (median) | speedup (best) |")
print("|---|---:|---:|---:|---:|---:|")
for name in ("forward", "forward_backward"):
    base = times[(name, threads[0])]
    for t in threads:
        v = times[(name, t)]
        print(f"| {name} | {t} | {statistics.median(v):.1f} | {min(v):.1f} | "
              f"{statistics.median(base) / statistics.median(v):.2f}x | {min(base) / min(v):.2f}x |")
EOF
