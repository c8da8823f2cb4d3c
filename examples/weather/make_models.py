#!/usr/bin/python3
"""Two ClimaX-shaped PyTorch models with a seeded random init, saved as Lightning checkpoints, and
PyTorch's tokens for both on the inputs of an ERA5-like NetCDF file (make_era5.py).

    /usr/bin/python3 examples/weather/make_models.py era5.nc OUT_DIR [--patch 2] [--dim 128]
        [--heads 8] [--ranks 4] [--seed 0] [--batch 4]

Writes into OUT_DIR:
  climax.ckpt        ClimaX's front end: token_embeds.{c}.proj (Conv2d(1, D, p, stride p)),
                     var_embed, var_query, var_agg (nn.MultiheadAttention), pos_embed
  dchag_c.ckpt       D-CHAG-C for --ranks ranks, the same shapes: the tokenizer, var_embed and
                     pos_embed, per rank partial.{r}.* (the D-CHAG code's cross-attention: query, q,
                     kv, proj) over a contiguous block of the model's channels, and final.*
  variables.txt      the models' channel order, one name per line (ClimaX's order, which is not
                     the file's): the --channels-file of scripts/convert_checkpoint.py
  reference.safetensors  PyTorch's tokens [T, L, D] at every time of the file: climax.f64,
                     climax.f32, dchag_xattn.f64, dchag_xattn.f32 (the same model in float64 and
                     float32), with the configuration in the metadata
Both checkpoints are saved as ClimaX's are: {"state_dict": {"net.<name>": tensor}, "epoch", ...,
"hyper_parameters"}, and hold tensors dchag does not (a transformer block, the norm, the head),
which the converter leaves out.

Inputs: every variable standardized by its own mean and standard deviation over the file (all
times and grid points, population deviation, in float64; a deviation of 0 counts as 1), as
dchag_weather does; ClimaX standardizes with its training set's statistics in the same way. The
modules and the weight init are bench/pytorch_dchag.py's (which reuse tests/golden/make_goldens.py's
ClimaX aggregation and the D-CHAG cross-attention), so this script holds no attention math.
"""
import argparse
import copy
import importlib.util
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

try:
    import numpy as np
    import netCDF4
    import torch
    from torch import nn
except ImportError as e:
    print(f"make_models.py: cannot import {e.name} ({e}); Debian: python3-torch, python3-netcdf4 "
          "(scripts/install-deps.sh)", file=sys.stderr)
    sys.exit(77)


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH = load("pytorch_dchag", os.path.join(ROOT, "bench", "pytorch_dchag.py"))
CONVERT = load("convert_checkpoint", os.path.join(ROOT, "scripts", "convert_checkpoint.py"))
ERA5 = load("make_era5", os.path.join(HERE, "make_era5.py"))


class Block(nn.Module):
    """A timm Block as ClimaX's blocks.{i} (not run here: dchag's tokens are its input)."""

    def __init__(self, D):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)


def backbone(D, p, out_vars):
    """What follows the front end in ClimaX: blocks, norm, head (Linear, GELU, Linear)."""
    m = nn.Module()
    m.blocks = nn.ModuleList([Block(D)])
    m.norm = nn.LayerNorm(D)
    m.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, out_vars * p * p))
    return m


def save_lightning(path, front_end, rest, hparams):
    sd = {f"net.{k}": v.detach().clone() for k, v in front_end.state_dict().items()}
    sd.update({f"net.{k}": v.detach().clone() for k, v in rest.state_dict().items()})
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.9.0",
                "state_dict": sd, "hyper_parameters": hparams}, path)
    return len(sd)


def standardized(path, names):
    """[T, C, H, W] float64 in `names` order, each variable standardized over the file."""
    with netCDF4.Dataset(path) as nc:
        missing = [n for n in names if n not in nc.variables]
        if missing:
            sys.exit(f"make_models.py: '{path}' lacks {len(missing)} of the models' variables: "
                     + ", ".join(missing))
        arrays = []
        for n in names:
            a = np.asarray(nc.variables[n][:], dtype=np.float32).astype(np.float64)  # [T, H, W]
            std = a.std()
            arrays.append((a - a.mean()) / (std if std > 0 else 1.0))
        hours = np.asarray(nc.variables["time"][:], dtype=np.float64)
    return torch.from_numpy(np.stack(arrays, axis=1)), hours


def tokens(model, images, batch):
    """The model's tokens [T, L, D] in float64 and in float32, `batch` times at a time."""
    m64 = copy.deepcopy(model).double()
    out64, out32 = [], []
    with torch.no_grad():
        for t in range(0, images.shape[0], batch):
            x = images[t:t + batch]
            out64.append(m64(x))
            out32.append(model(x.float()))
    return torch.cat(out64), torch.cat(out32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="NetCDF file of make_era5.py")
    ap.add_argument("out_dir")
    ap.add_argument("--patch", type=int, default=2, help="patch size p (default 2, as ClimaX)")
    ap.add_argument("--dim", type=int, default=128, help="token width D")
    ap.add_argument("--heads", type=int, default=8, help="attention heads (divide D)")
    ap.add_argument("--ranks", type=int, default=4, help="D-CHAG ranks (partial aggregators)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="times per PyTorch forward")
    a = ap.parse_args(argv)
    for name in ("patch", "dim", "heads", "ranks", "batch"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} is {getattr(a, name)}, expected >= 1")
    if a.dim % a.heads:
        ap.error(f"--dim {a.dim} is not a multiple of --heads {a.heads}")
    torch.set_num_threads(1)
    os.makedirs(a.out_dir, exist_ok=True)

    names = ERA5.climax_order()
    C = len(names)
    if a.ranks > C:
        ap.error(f"--ranks {a.ranks} exceeds the {C} channels")
    images, hours = standardized(a.data, names)
    T, _, H, W = images.shape
    if H % a.patch or W % a.patch:
        ap.error(f"the grid {H}x{W} of '{a.data}' is not a multiple of --patch {a.patch}")
    shape = types.SimpleNamespace(H=H, W=W, p=a.patch, D=a.dim, heads=a.heads, groups=a.ranks)

    with open(os.path.join(a.out_dir, "variables.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    hp = {"net": {"class_path": "climax.arch.ClimaX", "init_args": {
        "default_vars": names, "img_size": [H, W], "patch_size": a.patch, "embed_dim": a.dim,
        "depth": 1, "num_heads": a.heads, "decoder_depth": 1}}}

    models = {}
    for key, seed in (("climax", a.seed), ("dchag_xattn", a.seed + 1)):
        torch.manual_seed(seed)
        model = BENCH.FlatModel(shape, C) if key == "climax" else \
            BENCH.DchagModel(shape, C, "xattn")
        BENCH.init_weights(model, seed)
        rest = backbone(a.dim, a.patch, C)
        BENCH.init_weights(rest, seed + 100)
        model.eval()
        path = os.path.join(a.out_dir, "climax.ckpt" if key == "climax" else "dchag_c.ckpt")
        hparams = copy.deepcopy(hp)
        if key != "climax":
            hparams["net"]["class_path"] = "dchag.DchagClimaX"
            hparams["net"]["init_args"].update(ranks=a.ranks, partial="cross_attention")
        n = save_lightning(path, model, rest, hparams)
        print(f"wrote {path}: {n} tensors ({sum(1 for _ in model.parameters())} of the front end)")
        models[key] = model

    ref = []
    meta = {"channels": ",".join(names), "times": ",".join(f"{h:g}" for h in hours),
            "patch": a.patch, "dim": a.dim, "heads": a.heads, "ranks": a.ranks,
            "data": os.path.abspath(a.data)}
    for key, model in models.items():
        t64, t32 = tokens(model, images, a.batch)
        err = ((t32.double() - t64).abs().max() / t64.abs().max()).item()
        print(f"{key}: tokens {list(t64.shape)}, PyTorch float32 against float64: {err:.3e}")
        ref += [(f"{key}.f64", t64), (f"{key}.f32", t32)]
    path = os.path.join(a.out_dir, "reference.safetensors")
    CONVERT.write_safetensors(path, ref, meta)
    print(f"wrote {path}: {T} times, {C} channels, {H}x{W}, p={a.patch}, D={a.dim}, "
          f"{a.heads} heads, {a.ranks} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
