#!/usr/bin/env bash
# Draws the figures and writes the tables of the memory and throughput study from dchag_sweep's
# JSON lines (bench/run_sweep.sh calls it; it can be re-run on a kept sweep.jsonl).
#
#   bench/plot_sweep.sh SWEEP_JSONL OUT_DIR
#
# OUT_DIR gets sweep_memory.png (memory per rank vs C at the largest P), sweep_time.png (forward +
# backward step time vs C at the largest P), sweep_memory_vs_P.png (memory per rank vs P at the
# largest C), sweep_state.png (memory per rank less parameters and gradients vs C at the largest
# P: keep against recompute) and tables.md. Needs gnuplot (with the pngcairo terminal) and
# python3 (standard library only: bench/sweep_data.py turns the JSON into gnuplot data files).
set -euo pipefail

die() { echo "plot_sweep.sh: $*" >&2; exit 1; }
[[ $# -ge 1 ]] && [[ $1 == -h || $1 == --help ]] && { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
[[ $# -eq 2 ]] || die "usage: plot_sweep.sh SWEEP_JSONL OUT_DIR"
jsonl=$1 out_dir=$2
[[ -s $jsonl ]] || die "$jsonl is missing or empty"
command -v gnuplot >/dev/null || die "gnuplot not found (Debian: apt-get install gnuplot-nox)"
PYTHON=${PYTHON:-python3}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" "$here/sweep_data.py" "$jsonl" "$work"
cfg=$("$PYTHON" -c 'import json, sys
r = json.loads(open(sys.argv[1]).readline())
print("B={B}, {H}x{W} image, p={p}, D={D}, {heads} heads, {scalar}, {exec}".format(**r))' "$jsonl")
(cd "$work" && gnuplot -e "cfg='$cfg'" "$here/plot_sweep.gp")
cp "$work"/sweep_memory.png "$work"/sweep_time.png "$work"/sweep_memory_vs_P.png \
  "$work"/sweep_state.png "$work"/tables.md "$out_dir"/
echo "plot_sweep.sh: wrote $out_dir/{sweep_memory,sweep_time,sweep_memory_vs_P,sweep_state}.png and tables.md" >&2
