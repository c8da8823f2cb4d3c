#!/usr/bin/python3
"""Write the small safetensors fixtures of this directory, as PyTorch would save them: F64 values
and shapes that differ from dchag's by dimensions of size 1.

    /usr/bin/python3 tests/checkpoint/make_fixtures.py [output_dir]

numpy only (no PyTorch), so that the files are written independently of dchag's writer. Element i
of the tensor called `name` holds fixture_value(name, i), which tests/test_checkpoint.cpp
computes the same way: an integer formula divided by 977.0, a correctly rounded double that is not
a float, so that a float model shows the rounding and a double model reads it exactly.

flat_f64_unit_dims: a FlatFrontEnd (climax convention) with C = 2 (channels "t2m,u10"), H = W = 4,
p = 2 (L = 4), D = 4, heads = 2; every tensor F64.
dchag_linear_unit_dims: a DchagEmulation (artifact convention, linear partials, tree 1) with C = 3,
groups {0, 1} and {2}, H = W = 4, p = 2, D = 4, heads = 2; F64 but pos_embed F32.
"""
import json
import os
import struct
import sys

import numpy as np


def fixture_value(name, i):
    salt = sum(name.encode("ascii")) % 1009
    return float((i * 7919 + salt * 104729) % 1009 - 504) / 977.0


def tensor(name, shape, dtype="F64"):
    n = int(np.prod(shape, dtype=np.int64))
    a = np.array([fixture_value(name, i) for i in range(n)], dtype=np.float64).reshape(shape)
    return name, a.astype({"F64": "<f8", "F32": "<f4"}[dtype])


def write(path, tensors, metadata):
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, a in tensors:
        b = np.ascontiguousarray(a).tobytes()
        dtype = {"<f8": "F64", "<f4": "F32"}[a.dtype.str]
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("ascii")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    print(f"{os.path.basename(path)}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    D, p, L = 4, 2, 4
    write(os.path.join(out, "flat_f64_unit_dims.safetensors"), [
        tensor("token_embeds.0.proj.weight", [D, p, p]),        # [D, 1, p, p] without the 1
        tensor("token_embeds.0.proj.bias", [1, D]),             # [D] with a 1 in front
        tensor("token_embeds.1.proj.weight", [D, 1, p, p]),
        tensor("token_embeds.1.proj.bias", [D]),
        tensor("var_embed", [2, D]),                            # [1, C, D]
        tensor("var_query", [D]),                               # [1, 1, D]
        tensor("var_agg.in_proj_weight", [3 * D, D]),
        tensor("var_agg.in_proj_bias", [3 * D, 1]),
        tensor("var_agg.out_proj.weight", [D, D]),
        tensor("var_agg.out_proj.bias", [D]),
        tensor("pos_embed", [L, D]),                            # [1, L, D]
    ], {"channels": "t2m,u10"})
    write(os.path.join(out, "dchag_linear_unit_dims.safetensors"), [
        *[tensor(f"token_embeds.{c}.proj.{k}", s)
          for c in range(3) for k, s in (("weight", [D, 1, p, p]), ("bias", [D]))],
        tensor("var_embed", [1, 3, D]),
        tensor("partial.0.weight", [1, 2]),                     # [2]
        tensor("partial.0.bias", []),                           # [1]
        tensor("partial.1.weight", []),                         # [1]
        tensor("partial.1.bias", [1, 1]),                       # [1]
        tensor("final.query", [1, 1, D]),                       # [D]
        tensor("final.q.weight", [D, D]),
        tensor("final.kv.weight", [2 * D, D]),
        tensor("final.proj.weight", [D, D]),
        tensor("final.proj.bias", [D]),
        tensor("pos_embed", [1, L, D], "F32"),
    ], {})


if __name__ == "__main__":
    main()
