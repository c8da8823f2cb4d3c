#!/usr/bin/python3
"""dchag against PyTorch on the same weights and inputs: the ClimaX flat front end and D-CHAG on one
process (linear or cross-attention partial aggregation), time, memory and agreement.

    /usr/bin/python3 bench/pytorch_dchag.py [--build build] [--models flat,dchag_linear,dchag_xattn]
        [--C 500] [--C-dchag 500] [--groups 4] [--H 64] [--W 64] [--p 8] [--D 256] [--heads 8]
        [--B 1] [--reps 5] [--keep DIR]

For each model it builds the PyTorch module (float32, CPU, one thread) with dchag's parameter names,
fills the weights from a seed, writes weights + images + grad_out + configuration metadata to a
safetensors file, and then, in the same run:
  1. times PyTorch: forward with autograd on (the graph dropped) and forward + backward of
     out.backward(grad_out), medians over --reps after --warmup runs, wall-clock and process CPU;
  2. measures PyTorch's memory: the parameter bytes plus the peak of the tensor bytes allocated during
     one forward + backward (gradients set to None before it), from the memory events of
     torch.profiler(profile_memory=True); and, for reference, the bytes of the distinct tensors
     autograd saved for backward (saved_tensors_hooks), parameters and inputs excluded;
  3. runs dchag_run (bench/run_safetensors.cpp) on the file with the pooled and the materialized
     strategy: its medians and its MemoryTracker peak (parameters, gradients, activations,
     workspace: every Kokkos allocation after the inputs);
  4. checks agreement: the output and every parameter gradient of dchag (float32) and of PyTorch
     (float32) against PyTorch in float64 on the same weights, error = max|x - ref| / max|ref| per
     tensor, within tolerances derived from the float32 error bound (see tolerances()).
Prints Markdown tables; exits with status 1 when an agreement check fails. The PyTorch modules
reuse tests/golden/make_goldens.py (safetensors writer/reader, ClimaX aggregation, the D-CHAG
artifact cross-attention's math).
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Tolerances from the float32 error bound of a sum of n terms, |error| <= n*u*sum|terms| with
# u = 2^-24 (6.0e-8), times 2 for the stages that follow one another:
#   output:    the longest forward reduction is over max(C, D, p*p) terms (the softmax-weighted sum
#              over the channels, the projections, the tokenizer): 2*500*u = 6.0e-5 at the flagship;
#   gradients: the weights every position and channel share (the key/query/value projections, the
#              partial weights) sum over B*L*max(C, D) terms: 2*64*500*u = 3.8e-3 at the flagship.
# Both compare with max|ref| of the tensor, not with sum|terms|: a tensor whose gradient cancels
# (a bias summed over every position) could exceed them without a bug, so the errors of PyTorch's
# own float32 run against float64 are printed beside dchag's.
U32 = 2.0 ** -24


def tolerances(a, C):
    L = (a.H // a.p) * (a.W // a.p)
    return {"out": 2 * max(C, a.D, a.p * a.p) * U32, "grad": 2 * a.B * L * max(C, a.D) * U32}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"),
                    help="build directory holding bench/dchag_run (default: build)")
    ap.add_argument("--dchag-run", help="path of dchag_run (default: BUILD/bench/dchag_run)")
    ap.add_argument("--models", default="flat,dchag_linear,dchag_xattn",
                    help="comma-separated: flat, dchag_linear, dchag_xattn")
    ap.add_argument("--C", type=int, default=500, help="channels of the flat model")
    ap.add_argument("--C-dchag", type=int, default=None, help="channels of the D-CHAG models (default: --C)")
    ap.add_argument("--groups", type=int, default=4, help="D-CHAG groups (emulated ranks), contiguous blocks")
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--W", type=int, default=64)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed runs (medians reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the safetensors files and JSON results in this directory")
    a = ap.parse_args()
    if a.C_dchag is None:
        a.C_dchag = a.C
    for name in ("C", "C_dchag", "groups", "H", "W", "p", "D", "heads", "B", "reps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} is {getattr(a, name)}, expected >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.H % a.p or a.W % a.p:
        ap.error(f"--H {a.H} and --W {a.W} must be multiples of --p {a.p}")
    if a.D % a.heads:
        ap.error(f"--D {a.D} must be a multiple of --heads {a.heads}")
    if a.groups > a.C_dchag:
        ap.error(f"--groups {a.groups} exceeds --C-dchag {a.C_dchag}")
    a.models = a.models.split(",")
    for m in a.models:
        if m not in ("flat", "dchag_linear", "dchag_xattn"):
            ap.error(f"--models: '{m}', expected flat, dchag_linear or dchag_xattn")
    a.dchag_run = a.dchag_run or os.path.join(a.build, "bench", "dchag_run")
    if not os.access(a.dchag_run, os.X_OK):
        ap.error(f"{a.dchag_run} not found; build it: cmake --build {a.build} --target dchag_run")
    return a


# One thread everywhere (OpenMP, OpenBLAS, MKL), before torch loads them; dchag_run gets the same.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

try:
    import numpy as np
    import torch
    from torch import nn
except ImportError as e:
    sys.exit(f"pytorch_dchag.py: cannot import torch with {sys.executable} ({e}); run it with "
             "/usr/bin/python3 (Debian's python3-torch, scripts/install-deps.sh)")


def import_goldens():
    path = os.path.join(ROOT, "tests", "golden", "make_goldens.py")
    spec = importlib.util.spec_from_file_location("make_goldens", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = import_goldens()  # write_safetensors, read_safetensors, climax_aggregate, block_sizes


# ------------------------------------------------------------------------------------------------
# The models, with dchag's (ClimaX / D-CHAG artifact) parameter names
# ------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """ClimaX token_embeds.{c}: Conv2d(1, D, p, stride=p) named proj; [B, 1, H, W] -> [B, L, D]."""

    def __init__(self, D, p):
        super().__init__()
        self.proj = nn.Conv2d(1, D, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Tokens(nn.Module):
    """token_embeds + var_embed + pos_embed, shared by both front ends."""

    def __init__(self, a, C):
        super().__init__()
        L = (a.H // a.p) * (a.W // a.p)
        self.token_embeds = nn.ModuleList([PatchEmbed(a.D, a.p) for _ in range(C)])
        self.var_embed = nn.Parameter(torch.zeros(1, C, a.D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L, a.D))

    def tokens(self, x):
        """[B, C, H, W] -> [B, C, L, D]: per-channel tokenizer plus the channel embedding."""
        t = torch.stack([emb(x[:, c:c + 1]) for c, emb in enumerate(self.token_embeds)], dim=1)
        return t + self.var_embed.unsqueeze(2)


class FlatModel(Tokens):
    """ClimaX: var_query attends over the C channel tokens of every patch (nn.MultiheadAttention)."""

    def __init__(self, a, C):
        super().__init__(a, C)
        self.var_query = nn.Parameter(torch.zeros(1, 1, a.D))
        self.var_agg = nn.MultiheadAttention(a.D, a.heads, batch_first=True)

    def forward(self, x):
        return G.climax_aggregate(self.tokens(x), self.var_query, self.var_agg) + self.pos_embed


class ArtifactXattn(nn.Module):
    """The D-CHAG artifact's cross-attention (make_goldens.Artifact as a module): query [D], q and kv
    without bias, proj with bias; [B, N, L, D] -> [B, L, D]."""

    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(D))
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * D, bias=False)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        B, N, L, D = x.shape
        nh, hd = self.heads, D // self.heads
        q = self.q(self.query).reshape(nh, hd)
        kv = self.kv(x)                                                # [B, N, L, 2D]
        k = kv[..., :D].reshape(B, N, L, nh, hd)
        v = kv[..., D:].reshape(B, N, L, nh, hd)
        s = torch.einsum("bnlhe,he->bnlh", k, q) / math.sqrt(hd)
        att = torch.softmax(s, dim=1)
        o = torch.einsum("bnlh,bnlhe->blhe", att, v).reshape(B, L, D)
        return self.proj(o)


class LinearPartial(nn.Module):
    """D-CHAG-L partial aggregation: a learned weighted sum over the group's channels plus a bias."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.einsum("bcld,c->bld", x, self.weight) + self.bias


class DchagModel(Tokens):
    """D-CHAG on one process: group r (contiguous block) folds its channels into one partial token
    (partial.{r}), the P partial tokens are stacked in group order and folded by final."""

    def __init__(self, a, C, partial):
        super().__init__(a, C)
        self.sizes = G.block_sizes(C, a.groups)
        self.partial = nn.ModuleList([LinearPartial(n) if partial == "linear" else ArtifactXattn(a.D, a.heads)
                                      for n in self.sizes])
        self.final = ArtifactXattn(a.D, a.heads)

    def forward(self, x):
        t = self.tokens(x)
        ys, c0 = [], 0
        for n, agg in zip(self.sizes, self.partial):
            ys.append(agg(t[:, c0:c0 + n]))
            c0 += n
        return self.final(torch.stack(ys, dim=1)) + self.pos_embed


def init_weights(model, seed):
    """Deterministic, non-degenerate values (the ClimaX init has zero queries, which makes every
    attention uniform and several gradients zero): weights N(0, 1/fan_in), biases N(0, 0.01),
    queries and embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or name.endswith("_bias"):
                std = 0.1
            elif leaf in ("query", "var_query", "var_embed", "pos_embed"):
                std = 1.0
            else:  # weights: conv [D,1,p,p], linear [out,in], in_proj [3D,D], partial weights [n]
                std = 1.0 / math.sqrt(prm[0].numel() if prm.dim() > 1 else prm.numel())
            prm.copy_(torch.randn(prm.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

def timed(fn, reps, warmup, between):
    for _ in range(warmup):
        between()
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        between()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - w0))
        cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def torch_times(model, images, grad_out, a):
    clear = lambda: model.zero_grad(set_to_none=True)

    def forward():
        out = model(images)
        del out  # drops the graph, as a training step would after backward

    def forward_backward():
        model(images).backward(grad_out)

    fwd, fwd_cpu = timed(forward, a.reps, a.warmup, clear)
    fb, fb_cpu = timed(forward_backward, a.reps, a.warmup, clear)
    return {"fwd_ms": fwd, "fwd_cpu_ms": fwd_cpu, "fwdbwd_ms": fb, "fwdbwd_cpu_ms": fb_cpu}


def torch_memory(model, images, grad_out):
    """Parameter bytes + peak of the tensor bytes allocated during one forward + backward, from the
    profiler's memory events (allocations positive, frees negative, in recorded order). Also the
    bytes of the distinct storages autograd saves for backward, parameters and inputs excluded."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(images).backward(grad_out)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_us())  # stable: ties keep the recorded order
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)

    outside = {p.data_ptr() for p in model.parameters()} | {images.data_ptr(), grad_out.data_ptr()}
    saved = {}

    def pack(t):
        s = t.storage()
        if s.data_ptr() not in outside:
            saved[s.data_ptr()] = s.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
    del out
    model.zero_grad(set_to_none=True)
    return {"param_bytes": param_bytes, "step_peak_bytes": peak, "peak_bytes": param_bytes + peak,
            "saved_bytes": sum(saved.values()), "memory_events": len(events)}


def reference64(model, images, grad_out):
    """Output and parameter gradients of the same model in float64."""
    m = copy.deepcopy(model).double()
    m.zero_grad(set_to_none=True)
    out = m(images.double())
    out.backward(grad_out.double())
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    return out.detach(), grads


def float32_result(model, images, grad_out):
    model.zero_grad(set_to_none=True)
    out = model(images)
    out.backward(grad_out)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def rel_err(x, ref):
    x = torch.from_numpy(np.array(x, dtype=np.float64)) if isinstance(x, np.ndarray) else x.to(torch.float64)
    ref = ref.to(torch.float64)
    if x.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def errors(out, grads, ref_out, ref_grads):
    """Per-tensor errors against the float64 reference: {"out": e, <parameter name>: e of its
    gradient, ...}; a gradient missing from `grads` counts as infinitely wrong."""
    e = {"out": rel_err(out, ref_out)}
    for n, r in ref_grads.items():
        e[n] = rel_err(grads[n], r) if n in grads else float("inf")
    return e


def judge(err, torch_err, tol):
    """Every tensor within its tolerance: the bound of tolerances(), or 10x PyTorch float32's own
    error where that is larger (a tensor whose exact value cancels, e.g. a bias gradient summed over
    every position, is further from float64 in any float32 evaluation). Returns the output's error,
    the gradient closest to its tolerance, and whether everything passed."""
    allowed = {n: max(tol["out" if n == "out" else "grad"], 10 * torch_err[n]) for n in err}
    worst = max((n for n in err if n != "out"), key=lambda n: err[n] / allowed[n])
    return {"out_err": err["out"], "out_allowed": allowed["out"], "grad_worst": worst,
            "grad_err": err[worst], "grad_allowed": allowed[worst],
            "agree": all(err[n] <= allowed[n] for n in err),
            "missing": [n for n in err if err[n] == float("inf")]}


def run_dchag(a, path, strategy, out_path):
    env = dict(os.environ)
    cmd = [a.dchag_run, path, "--strategy", strategy, "--reps", str(a.reps), "--out", out_path]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"pytorch_dchag.py: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------

def main():
    a = parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    workdir = a.keep or tempfile.mkdtemp(prefix="pytorch_dchag.")
    os.makedirs(workdir, exist_ok=True)
    print(f"PyTorch {torch.__version__} (one thread) vs {a.dchag_run}; B={a.B}, {a.H}x{a.W}, p={a.p}, "
          f"D={a.D}, {a.heads} heads; medians of {a.reps} runs after {a.warmup} warm-up; "
          f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}", flush=True)

    results, failed = [], False
    for name in a.models:
        C = a.C if name == "flat" else a.C_dchag
        torch.manual_seed(a.seed)
        model = FlatModel(a, C) if name == "flat" else DchagModel(a, C, name.split("_")[1])
        init_weights(model, a.seed)
        model.train()
        L = (a.H // a.p) * (a.W // a.p)
        g = torch.Generator().manual_seed(a.seed + 1)
        images = torch.randn(a.B, C, a.H, a.W, generator=g)
        grad_out = torch.randn(a.B, L, a.D, generator=g)

        meta = dict(kind="flat" if name == "flat" else "dchag", C=C, H=a.H, W=a.W, p=a.p, D=a.D,
                    heads=a.heads, B=a.B, seed=a.seed)
        if name != "flat":
            meta.update(partial=name.split("_")[1], groups=a.groups, map="blocks", tree=1)
        path = os.path.join(workdir, f"{name}.safetensors")
        G.write_safetensors(path, list(model.named_parameters()) + [("images", images), ("grad_out", grad_out)],
                            meta)

        ref_out, ref_grads = reference64(model, images, grad_out)
        t_out, t_grads = float32_result(model, images, grad_out)
        row = {"model": name, "C": C, "groups": a.groups if name != "flat" else 1,
               "torch": torch_times(model, images, grad_out, a),
               "torch_memory": torch_memory(model, images, grad_out),
               "torch_errors": errors(t_out, t_grads, ref_out, ref_grads)}
        for strategy in ("pooled", "materialized"):
            out_path = os.path.join(workdir, f"{name}.{strategy}.out.safetensors")
            d = run_dchag(a, path, strategy, out_path)
            values, _ = G.read_safetensors(out_path)
            grads = {k[len("grad."):]: v for k, v in values.items() if k.startswith("grad.")}
            d["tolerance"] = tolerances(a, C)
            d["agreement"] = judge(errors(values["out"], grads, ref_out, ref_grads), row["torch_errors"],
                                   d["tolerance"])
            failed |= not d["agreement"]["agree"]
            row[strategy] = d
        results.append(row)
        print(f"{name}: done", file=sys.stderr, flush=True)

    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results)
    if not a.keep:
        for fname in os.listdir(workdir):
            os.remove(os.path.join(workdir, fname))
        os.rmdir(workdir)
    return 1 if failed else 0


def report(results):
    mib = 1 << 20
    print("\nTime, median ms (wall-clock / process CPU); ratio = PyTorch / dchag on CPU time\n")
    print("| model | C | pass | PyTorch | dchag pooled | dchag materialized | PyTorch/pooled | PyTorch/materialized |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        for label, key in (("forward", "fwd"), ("forward+backward", "fwdbwd")):
            t, po, ma = r["torch"], r["pooled"], r["materialized"]
            print(f"| {r['model']} | {r['C']} | {label} | {t[key + '_ms']:.1f} / {t[key + '_cpu_ms']:.1f} "
                  f"| {po[key + '_ms']:.1f} / {po[key + '_cpu_ms']:.1f} | {ma[key + '_ms']:.1f} / {ma[key + '_cpu_ms']:.1f} "
                  f"| {t[key + '_cpu_ms'] / po[key + '_cpu_ms']:.2f}x | {t[key + '_cpu_ms'] / ma[key + '_cpu_ms']:.2f}x |")
    print("\nMemory, MiB: PyTorch = parameters + peak of tensors allocated in one forward+backward "
          "(profiler); dchag = MemoryTracker peak\n")
    print("| model | C | PyTorch params | PyTorch step peak | PyTorch total | (saved for backward) "
          "| dchag pooled | dchag materialized | PyTorch/pooled | PyTorch/materialized |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m, po, ma = r["torch_memory"], r["pooled"], r["materialized"]
        print(f"| {r['model']} | {r['C']} | {m['param_bytes'] / mib:.1f} | {m['step_peak_bytes'] / mib:.1f} "
              f"| {m['peak_bytes'] / mib:.1f} | ({m['saved_bytes'] / mib:.1f}) | {po['peak_bytes'] / mib:.1f} "
              f"| {ma['peak_bytes'] / mib:.1f} | {m['peak_bytes'] / po['peak_bytes']:.2f}x "
              f"| {m['peak_bytes'] / ma['peak_bytes']:.2f}x |")
    print("\nAgreement with PyTorch float64 on the same weights: max|x - ref| / max|ref| per tensor, "
          "and the tolerance it is held to\n")
    print("| model | run | output (tolerance) | closest gradient to its tolerance | error (tolerance) | passed |")
    print("|---|---|---:|---|---:|---|")
    for r in results:
        te = r["torch_errors"]
        worst = max((n for n in te if n != "out"), key=lambda n: te[n])
        print(f"| {r['model']} | PyTorch float32 | {te['out']:.2e} | {worst} (largest) | {te[worst]:.2e} | reference |")
        for s in ("pooled", "materialized"):
            d = r[s]["agreement"]
            missing = f", {len(d['missing'])} gradients missing" if d["missing"] else ""
            print(f"| {r['model']} | dchag {s} | {d['out_err']:.2e} ({d['out_allowed']:.1e}) | {d['grad_worst']} "
                  f"| {d['grad_err']:.2e} ({d['grad_allowed']:.1e}) | {'yes' if d['agree'] else 'NO'}{missing} |")


if __name__ == "__main__":
    sys.exit(main())
