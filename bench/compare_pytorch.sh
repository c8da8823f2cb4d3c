#!/usr/bin/env bash
# Times the flat (ClimaX) front end in dchag and in PyTorch at one configuration, in the same run,
# one after the other, both on one thread, and prints the medians and the ratios.
#
#   bench/compare_pytorch.sh BUILD_DIR [--C 500] [--H 64] [--W 64] [--p 8] [--D 256] [--heads 8]
#                            [--B 1] [--reps 5] [--keep DIR]
#
# BUILD_DIR holds bench/dchag_bench (cmake --build BUILD_DIR --target dchag_bench); this script
# builds nothing. --reps: Google Benchmark repetitions on the dchag side, timed runs on the PyTorch
# side; medians of both are compared. --keep DIR keeps the raw JSON of both sides there.
# PYTHON (default /usr/bin/python3) must import torch.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "compare_pytorch.sh: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
build_dir=$1
shift

B=1 C=500 H=64 W=64 p=8 D=256 heads=8 reps=5 keep=""
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --B) B=$2 ;; --C) C=$2 ;; --H) H=$2 ;; --W) W=$2 ;; --p) p=$2 ;; --D) D=$2 ;;
    --heads) heads=$2 ;; --reps) reps=$2 ;; --keep) keep=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
for v in B C H W p D heads reps; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--$v is '${!v}', expected a positive integer"
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bench_bin=$build_dir/bench/dchag_bench
[[ -x $bench_bin ]] || die "$bench_bin not found; build it first:
  cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release -DDCHAG_ENABLE_BENCHMARKS=ON
  cmake --build $build_dir --target dchag_bench"
PYTHON=${PYTHON:-/usr/bin/python3}
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON to a python3 with torch)"
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) ||
  die "$PYTHON cannot import torch; install Debian's python3-torch (scripts/install-deps.sh) or set PYTHON"

if [[ -n $keep ]]; then
  mkdir -p "$keep"
  out=$keep
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi

# One thread on both sides: Kokkos' host space, OpenBLAS, OpenMP, torch intra/inter-op.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

config="B:$B,C:$C,H:$H,W:$W,p:$p,D:$D,heads:$heads"
echo "config $config, $reps repetitions, one thread, $(date -u +%Y-%m-%dT%H:%MZ)" >&2
echo "dchag:   $bench_bin" >&2
"$bench_bin" --dchag_config="$config" --benchmark_filter='^FlatFrontEnd/' \
  --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true \
  --benchmark_format=json >"$out/dchag.json"
echo "pytorch: $PYTHON $here/pytorch_flat.py (torch $torch_version)" >&2
"$PYTHON" "$here/pytorch_flat.py" --B "$B" --C "$C" --H "$H" --W "$W" --p "$p" --D "$D" \
  --heads "$heads" --reps "$reps" >"$out/pytorch.json"

"$PYTHON" - "$out/dchag.json" "$out/pytorch.json" <<'EOF'
import json
import sys

dchag = json.load(open(sys.argv[1]))
torch = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])

def dchag_median(kind, strategy, field):
    prefix = f"FlatFrontEnd/{kind}/{strategy}/"
    for b in dchag["benchmarks"]:
        if b["name"].startswith(prefix) and b.get("aggregate_name") == "median":
            scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
            return b[field] * scale
    sys.exit(f"compare_pytorch.sh: no median for {prefix} in the dchag output")

rows = [("forward", "forward"), ("forward+backward", "forward_backward")]
for title, field, tfield in (("wall-clock", "real_time", "median_s"),
                             ("process CPU", "cpu_time", "cpu_median_s")):
    print(f"\nmedian {title} time, ms")
    print(f"| {'pass':<16} | {'PyTorch':>8} | {'dchag pooled':>12} | {'dchag materialized':>18} "
          f"| {'PyTorch/pooled':>14} | {'PyTorch/materialized':>20} |")
    print(f"|{'-' * 18}|{'-' * 9}:|{'-' * 13}:|{'-' * 19}:|{'-' * 15}:|{'-' * 21}:|")
    for label, key in rows:
        t = torch[key][tfield]
        po = dchag_median(key, "pooled", field)
        ma = dchag_median(key, "materialized", field)
        print(f"| {label:<16} | {t * 1e3:8.2f} | {po * 1e3:12.2f} | {ma * 1e3:18.2f} "
              f"| {t / po:13.2f}x | {t / ma:19.2f}x |")
    t = torch["forward_no_grad"][tfield]
    print(f"(PyTorch forward under torch.no_grad: {t * 1e3:.2f} ms, "
          f"{t / dchag_median('forward', 'pooled', field):.2f}x the pooled forward)")

# The pooled path's other memory policies (DESIGN 3.8): inference forwards, recompute steps.
for title, field, tfield in (("wall-clock", "real_time", "median_s"),
                             ("process CPU", "cpu_time", "cpu_median_s")):
    inf = dchag_median("forward", "inference", field)
    rec = dchag_median("forward_backward", "recompute", field)
    print(f"dchag {title}: inference forward {inf * 1e3:.2f} ms "
          f"({torch['forward'][tfield] / inf:.2f}x PyTorch's forward, "
          f"{torch['forward_no_grad'][tfield] / inf:.2f}x its no_grad forward); recompute "
          f"forward+backward {rec * 1e3:.2f} ms ({torch['forward_backward'][tfield] / rec:.2f}x)")

print()
for label, key, strategy, target in (("pooled forward", "forward", "pooled", 12.0),
                                     ("pooled forward+backward (keep)", "forward_backward",
                                      "pooled", 10.0),
                                     ("pooled forward+backward (recompute)", "forward_backward",
                                      "recompute", 8.0)):
    for clock, field, tfield in (("wall-clock", "real_time", "median_s"),
                                 ("process CPU", "cpu_time", "cpu_median_s")):
        speedup = torch[key][tfield] / dchag_median(key, strategy, field)
        verdict = "met" if speedup >= target else f"missed by {target / speedup:.2f}x"
        print(f"target {label} >= {target:g}x faster than PyTorch ({clock}): "
              f"{speedup:.2f}x, {verdict}")
EOF
