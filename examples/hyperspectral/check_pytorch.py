#!/usr/bin/python3
"""Checks what dchag_hyperspectral wrote to --out: the weights turn into a PyTorch state dict
(scripts/convert_checkpoint.py --to-pytorch) that holds the whole model (every band's tokenizer,
the partial and final aggregators, the decoder) in the shapes of the run, bit for bit the values of
the safetensors file; the loss curve is a CSV and, where gnuplot exists, a PNG.

    check_pytorch.py --converter scripts/convert_checkpoint.py --out DIR --bands C --patch p --dim D

Exits 0 when all holds, 1 when something does not, 77 when torch does not import (ctest: skipped).
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

try:
    import torch
except ImportError:
    print("check_pytorch.py: torch does not import (Debian: python3-torch); skipped")
    sys.exit(77)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return header, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--converter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bands", type=int, required=True)
    ap.add_argument("--patch", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    a = ap.parse_args()
    weights = os.path.join(a.out, "mae.safetensors")
    state_path = os.path.join(a.out, "mae.pt")
    subprocess.run([sys.executable, a.converter, "--to-pytorch", weights, state_path], check=True)
    state = torch.load(state_path)
    header, data = read_safetensors(weights)
    problems = []
    C, p, D = a.bands, a.patch, a.dim
    expected = {"decoder.weight": [C * p * p, 3 * D], "decoder.bias": [C * p * p],
                "var_embed": [1, C, D]}
    for c in range(C):
        expected[f"token_embeds.{c}.proj.weight"] = [D, 1, p, p]
    for name, shape in expected.items():
        if name not in state:
            problems.append(f"{name} is missing from the state dict")
        elif list(state[name].shape) != shape:
            problems.append(f"{name} has shape {list(state[name].shape)}, expected {shape}")
    if not any(k.startswith("partial.") for k in state) or not any(k.startswith("final.")
                                                                   for k in state):
        problems.append("the partial and final aggregators are missing from the state dict")
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32)
        t = state.get(name)
        if t is None or not torch.equal(t.reshape(-1), raw):
            problems.append(f"{name} differs from the safetensors file")
        elif not torch.isfinite(t).all():
            problems.append(f"{name} holds values that are not finite")
    csv = os.path.join(a.out, "loss.csv")
    if not os.path.isfile(csv) or sum(1 for _ in open(csv)) < 3:
        problems.append(f"{csv} is missing or holds no steps")
    png = os.path.join(a.out, "loss.png")
    if shutil.which("gnuplot"):
        if not os.path.isfile(png) or open(png, "rb").read(8) != b"\x89PNG\r\n\x1a\n":
            problems.append(f"{png} is missing or not a PNG")
    for p_ in problems:
        print("check_pytorch.py:", p_, file=sys.stderr)
    print(f"check_pytorch.py: {len(state)} tensors in {state_path}: "
          f"{'ok' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
