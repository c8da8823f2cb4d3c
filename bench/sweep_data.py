#!/usr/bin/env python3
"""Turns dchag_sweep's JSON lines into gnuplot data files and Markdown tables (standard library only).

    python3 bench/sweep_data.py SWEEP_JSONL OUT_DIR

Writes into OUT_DIR:
  vsC.<mode>.<strategy>.<memory>.dat
                              at the largest P in the file: C, peak MiB/rank, estimate MiB/rank,
                              forward ms, forward+backward ms, state MiB/rank (the peak less the
                              rank's parameters and gradients)
  vsP.<mode>.<strategy>.<memory>.dat
                              at the largest C: the same against P
  series.gp                   gnuplot arrays naming those files, titles and line styles
                              (plot_sweep.gp loads it)
  tables.md                   the tables of bench/README.md's memory and throughput study
A run with --storage bf16 or fp16 is keyed as memory "<policy>-<storage>".
Several lines for one (mode, strategy, memory, C, P) (a re-run appended to the file): the last one
wins. Lines without a memory policy (older sweeps) are keep.
"""
import json
import math
import sys

MIB = 1 << 20
# Plot and table order; titles as in the paper (TP-only baseline, D-CHAG-L, D-CHAG-C).
SERIES = [
    ("tp_only", "materialized", "keep", "TP-only (materialized)"),
    ("dchag_linear", "pooled", "keep", "D-CHAG-L, pooled"),
    ("dchag_linear", "pooled", "recompute", "D-CHAG-L, pooled, recompute"),
    ("dchag_linear", "materialized", "keep", "D-CHAG-L, materialized"),
    ("dchag_xattn", "pooled", "keep", "D-CHAG-C, pooled"),
    ("dchag_xattn", "pooled", "recompute", "D-CHAG-C, pooled, recompute"),
    ("dchag_xattn", "materialized", "keep", "D-CHAG-C, materialized"),
    ("exact_flat", "pooled", "keep", "exact flat, pooled"),
    ("exact_flat", "pooled", "recompute", "exact flat, pooled, recompute"),
    ("flat", "pooled", "keep", "flat (1 process), pooled"),
    ("flat", "pooled", "recompute", "flat (1 process), pooled, recompute"),
    ("flat", "materialized", "keep", "flat (1 process), materialized"),
]
# Dash pattern per series: pooled keep solid, materialized dashed, recompute dotted.
DASH = {("pooled", "keep"): "1", ("materialized", "keep"): "2", ("pooled", "recompute"): "3"}


def load(path):
    runs = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"sweep_data.py: {path}:{n}: not JSON ({e})")
            r.setdefault("memory", "keep")
            # A storage type other than the scalar is part of the policy's name: keep-bf16.
            if r.get("storage", r.get("scalar")) != r.get("scalar"):
                r["memory"] += "-" + r["storage"]
            r["peak_MiB"] = r["peak_bytes_per_rank"] / MIB
            r["est_MiB"] = r["estimate_bytes_per_rank"] / MIB
            e = r["estimate"]
            state = r.get("state_bytes_per_rank",
                          r["peak_bytes_per_rank"] - e["parameters"] - e["gradients"])
            r["state_MiB"] = state / MIB
            runs[(r["mode"], r["strategy"], r["memory"], r["C"], r["P"])] = r
    if not runs:
        sys.exit(f"sweep_data.py: {path} holds no run")
    return runs


def row(r):
    return (r["peak_MiB"], r["est_MiB"], r["fwd_ms"], r["fwdbwd_ms"], r["state_MiB"])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    runs, out = load(sys.argv[1]), sys.argv[2]
    Ps = sorted({k[4] for k in runs})
    Cs = sorted({k[3] for k in runs})
    Pmax, Cmax = Ps[-1], Cs[-1]
    present = [s for s in SERIES if any(k[:3] == s[:3] for k in runs)]

    # gnuplot arrays: the series with data in each figure, their titles and line styles.
    colours = {"tp_only": "#d62728", "dchag_linear": "#1f77b4", "dchag_xattn": "#2ca02c",
               "exact_flat": "#9467bd", "flat": "#7f7f7f"}
    gp = [f"Pmax = {Pmax}", f"Cmax = {Cmax}"]
    for fig, keyfn, xs in (("vsC", lambda m, s, p, x: (m, s, p, x, Pmax), Cs),
                           ("vsP", lambda m, s, p, x: (m, s, p, Cmax, x), Ps)):
        shown, low, low_state = [], float("inf"), float("inf")
        for mode, strat, mem, title in present:
            rows = [(x, runs[keyfn(mode, strat, mem, x)]) for x in xs
                    if keyfn(mode, strat, mem, x) in runs]
            if not rows:
                continue
            with open(f"{out}/{fig}.{mode}.{strat}.{mem}.dat", "w") as f:
                f.write("# x peak_MiB estimate_MiB fwd_ms fwdbwd_ms state_MiB\n")
                for x, r in rows:
                    f.write("%d %.3f %.3f %.3f %.3f %.3f\n" % ((x,) + row(r)))
            shown.append((mode, strat, mem, title))
            low = min([low] + [r["peak_MiB"] for _, r in rows])
            low_state = min([low_state] + [max(r["state_MiB"], 1e-3) for _, r in rows])
        # A power of 2 a factor 4 below the lowest memory: room for the key under the lines.
        gp.append(f"{fig}_ymin = {2.0 ** math.floor(math.log2(low / 4)):g}")
        gp.append(f"{fig}_state_ymin = {2.0 ** math.floor(math.log2(low_state / 4)):g}")
        quote = lambda v: '"' + v + '"'
        gp.append(f"array {fig}_file[{len(shown)}] = [" +
                  ", ".join(quote(f"{fig}.{m}.{s}.{p}.dat") for m, s, p, _ in shown) + "]")
        gp.append(f"array {fig}_title[{len(shown)}] = [" + ", ".join(quote(t) for *_, t in shown) + "]")
        gp.append(f"array {fig}_colour[{len(shown)}] = [" +
                  ", ".join(quote(colours[m]) for m, *_ in shown) + "]")
        gp.append(f"array {fig}_dash[{len(shown)}] = [" +
                  ", ".join(DASH[(s, p)] for _, s, p, _ in shown) + "]")
    with open(f"{out}/series.gp", "w") as f:
        f.write("\n".join(gp) + "\n")

    any_run = next(iter(runs.values()))
    cfg = "B={B}, {H}x{W}, p={p}, D={D}, {heads} heads, {scalar}, {reps} timed steps, map {map}, tree {tree}".format(
        **any_run)
    md = [f"Configuration: {cfg}. Memory: peak bytes per rank (MemoryTracker high-water mark, "
          "max over ranks), MiB. Time: median over steps of the max over ranks, ms.", ""]

    def table(title, P, field, fmt):
        cols = [s for s in present if any((s[0], s[1], s[2], C, P) in runs for C in Cs)]
        md.append(f"{title}")
        md.append("")
        md.append("| C | " + " | ".join(s[3] for s in cols) + " |")
        md.append("|---:|" + "---:|" * len(cols))
        for C in Cs:
            cells = []
            for s in cols:
                r = runs.get((s[0], s[1], s[2], C, P))
                cells.append(fmt % r[field] if r else "")
            md.append(f"| {C} | " + " | ".join(cells) + " |")
        md.append("")

    # Memory and time vs C at the largest P.
    table(f"Peak memory per rank, MiB, P = {Pmax}", Pmax, "peak_MiB", "%.1f")
    table(f"Memory per rank less parameters and gradients, MiB, P = {Pmax}", Pmax, "state_MiB",
          "%.2f")
    table(f"Forward + backward step time, ms, P = {Pmax}", Pmax, "fwdbwd_ms", "%.1f")
    table(f"Forward time, ms, P = {Pmax}", Pmax, "fwd_ms", "%.1f")

    # Ratios to TP-only at the largest C and P.
    base = runs.get(("tp_only", "materialized", "keep", Cmax, Pmax))
    if base:
        md.append(f"Relative to TP-only at C = {Cmax}, P = {Pmax}")
        md.append("")
        md.append("| mode | strategy | memory | peak MiB/rank | memory vs TP-only | fwd+bwd ms | speed-up vs TP-only |")
        md.append("|---|---|---|---:|---:|---:|---:|")
        for mode, strat, mem, title in present:
            r = runs.get((mode, strat, mem, Cmax, Pmax))
            if r:
                md.append(f"| {mode} | {strat} | {mem} | {r['peak_MiB']:.1f} | "
                          f"{100 * r['peak_MiB'] / base['peak_MiB']:.1f}% "
                          f"({100 * (r['peak_MiB'] / base['peak_MiB'] - 1):+.0f}%) | {r['fwdbwd_ms']:.1f} | "
                          f"{base['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x |")
        md.append("")

    # P scaling at the largest C.
    md.append(f"Scaling with P at C = {Cmax}: peak MiB/rank (estimate) and forward + backward ms")
    md.append("")
    md.append("| mode | strategy | memory | " + " | ".join(f"P={P} MiB" for P in Ps) + " | "
              + " | ".join(f"P={P} ms" for P in Ps) + " |")
    md.append("|---|---|---|" + "---:|" * (2 * len(Ps)))
    for mode, strat, policy, title in present:
        rs = [runs.get((mode, strat, policy, Cmax, P)) for P in Ps]
        if not any(rs):
            continue
        mem = [f"{r['peak_MiB']:.1f} ({r['est_MiB']:.1f})" if r else "" for r in rs]
        tim = [f"{r['fwdbwd_ms']:.1f}" if r else "" for r in rs]
        md.append(f"| {mode} | {strat} | {policy} | " + " | ".join(mem) + " | " + " | ".join(tim) + " |")
    md.append("")

    # How far the estimates are from the measurement.
    worst = max(runs.values(), key=lambda r: abs(r["est_MiB"] / r["peak_MiB"] - 1))
    md.append(f"Estimate vs measured peak, all {len(runs)} runs: largest deviation "
              f"{100 * (worst['est_MiB'] / worst['peak_MiB'] - 1):+.2f}% ({worst['mode']} {worst['strategy']} "
              f"{worst['memory']} "
              f"C={worst['C']} P={worst['P']}: estimate {worst['est_MiB']:.2f} MiB, measured "
              f"{worst['peak_MiB']:.2f} MiB).")
    md.append("")
    with open(f"{out}/tables.md", "w") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
