#!/usr/bin/python3
"""Convert a PyTorch checkpoint of ClimaX or D-CHAG into a safetensors file that dchag loads, and
back.

    scripts/convert_checkpoint.py model.ckpt weights.safetensors [--channels a,b,... |
        --channels-file FILE] [--dtype f32|f16|bf16|keep] [--prefix P]... [--rename OLD=NEW]...
        [--keep-all]
    scripts/convert_checkpoint.py --to-pytorch weights.safetensors model.pt [--add-prefix P]
        [--lightning]

Input: what `torch.save` wrote, either a state dict (name -> tensor) or a dict holding one under
`state_dict` (a PyTorch Lightning `.ckpt`) or `model`. Needs PyTorch (Debian's python3-torch 1.13)
and numpy; the safetensors file is written here by hand (json + struct), so the `safetensors`
package is not needed.

Names. First a prefix is stripped: every `--prefix` given (in order, each where a name starts
with it), or by default `net.` (the LightningModule attribute ClimaX keeps its network in) and then
`module.` (DistributedDataParallel). Then every `--rename OLD=NEW` replaces a leading OLD by NEW.
The names dchag holds (the `parameters()` of its modules) are then kept as they are:

    ClimaX (FlatFrontEnd; D-CHAG with the climax convention under a prefix below)
      token_embeds.{c}.proj.weight [D, 1, p, p]   Conv2d(1, D, p, stride=p) of channel c
      token_embeds.{c}.proj.bias   [D]
      var_embed [1, C, D]   var_query [1, 1, D]   pos_embed [1, L, D]
      lead_time_embed.weight [D, 1], .bias [D]   (ClimaX's lead-time embedding, when used)
      tokenizer policies (FrontEndConfig::tokenizer): token_embed.proj.weight [D, 1, p, p] and
      .bias [D] (one tokenizer shared by every channel), channel_embed.proj.weight [D, F] and
      .bias [D] (the channel embedding from coordinates)
      var_agg.in_proj_weight [3D, D] (rows Wq; Wk; Wv)   var_agg.in_proj_bias [3D]
      var_agg.out_proj.weight [D, D]   var_agg.out_proj.bias [D]      (nn.MultiheadAttention)
    D-CHAG (DchagEmulation, DistributedFrontEnd): the tokenizer and pos_embed as above, and
      partial.{r}.<aggregator>   the partial aggregation of rank (channel group) r
      final.<aggregator>         the final aggregation over the gathered partial tokens
    where <aggregator> is one of
      cross-attention, artifact convention (the D-CHAG code's attention module):
        query [D], q.weight [D, D], kv.weight [2D, D] (rows Wk; Wv), proj.weight [D, D],
        proj.bias [D]
      cross-attention, climax convention: var_query, var_agg.* as above
      linear partial (D-CHAG-L): weight [C_r], bias [1]; with a local tree also top_weight [k],
        top_bias [1]

A D-CHAG model has one partial aggregator per rank and one final aggregator. Inside each, the
parameters of the D-CHAG code's attention module (`query`, `q`, `kv` without biases, `proj` with
a bias) and of its linear weighted sum keep their names above; dchag's `partial.{r}.` and `final.`
are the module names in front of them. A model that calls those modules differently maps onto
them by prefix, e.g. one whose ranks' aggregators are a ModuleList `agg_partial` and whose final
one is `agg_final`:

    --rename agg_partial.=partial. --rename agg_final.=final.

A rank's own checkpoint whose partial aggregator carries no rank index (`partial.query`, ...) is
given its rank with `--rank R` (`partial.X` -> `partial.R.X`).

Tensors dchag does not hold (transformer blocks, norms, the head, ...) are left out and listed on
stdout; `--keep-all` keeps them too (dchag ignores tensors it does not ask for). Tensors that are
not floating point (integer buffers such as `num_batches_tracked`) cannot be stored in a file dchag
reads and are always left out and listed.

Channel names (`--channels` or `--channels-file`, one name per line or comma-separated; index =
channel id c of token_embeds.{c} and of the rows of var_embed) go into the metadata key `channels`
as one comma-separated string, the key dchag's load_weights matches model channels by. Names must
be unique, non-empty and without commas, one per channel of var_embed.

dtypes: `keep` (default) writes each tensor in its own dtype (F32, F64, F16, BF16); f32, f16 and
bf16 convert every floating tensor (rounded to nearest even). dchag reads all four.

--to-pytorch: the reverse, a safetensors file (F32, F64, F16, BF16; what dchag's save_weights
writes) into a state dict saved with torch.save, every tensor in its file dtype and shape, names
prefixed with --add-prefix (e.g. `net.`), wrapped as {"state_dict": ...} with --lightning. The
file's metadata is printed. PyTorch -> safetensors -> dchag -> safetensors -> PyTorch keeps F32
tensors bit for bit.
"""

import argparse
import json
import re
import struct
import sys

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - reported at run time
    torch = None

# The names dchag's modules hold (DESIGN 6, tests/golden/README.md), after prefix stripping.
_ATTENTION_CLIMAX = (r"var_query"
                     r"|var_agg\.(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)")
_ATTENTION_ARTIFACT = r"query|q\.weight|kv\.weight|proj\.weight|proj\.bias"
_LINEAR = r"weight|bias|top_weight|top_bias"
DCHAG_NAME = re.compile(
    r"^(?:token_embeds\.\d+\.proj\.(?:weight|bias)"
    r"|(?:token_embed|channel_embed)\.proj\.(?:weight|bias)|lead_time_embed\.(?:weight|bias)"
    r"|var_embed|pos_embed|" + _ATTENTION_CLIMAX +
    r"|partial\.\d+\.(?:" + _ATTENTION_CLIMAX + "|" + _ATTENTION_ARTIFACT + "|" + _LINEAR + ")"
    r"|final\.(?:" + _ATTENTION_CLIMAX + "|" + _ATTENTION_ARTIFACT + "))$")
TOKEN_EMBED = re.compile(r"^token_embeds\.(\d+)\.proj\.(?:weight|bias)$")

# safetensors dtype <-> numpy (BF16 has no numpy type: its bits travel as int16 through torch).
NUMPY_OF = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<i2"}
DEFAULT_PREFIXES = ["net.", "module."]
CONVERT_TO = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # torch dtype names


class ConversionError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# safetensors, by hand
# ------------------------------------------------------------------------------------------------

def _st_dtype_of(t):
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16"}[t.dtype]


def _torch_dtype_of(name):
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16}[name]


def tensor_bytes(t):
    """(safetensors dtype, little-endian bytes) of a floating torch tensor."""
    t = t.detach().cpu().contiguous()
    dt = _st_dtype_of(t)
    a = (t.view(torch.int16) if dt == "BF16" else t).numpy().astype(NUMPY_OF[dt], copy=False)
    return dt, a.tobytes()


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, floating torch tensor), written in list order in their dtypes."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name, t in tensors:
        if name in header:
            raise ConversionError(f"duplicate tensor name '{name}'")
        dt, b = tensor_bytes(t)
        header[name] = {"dtype": dt, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    h += b" " * (-len(h) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """(list of (name, torch tensor) in file order, metadata dict)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ConversionError(f"'{path}' is {len(data)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ConversionError(f"'{path}': header length {n} is beyond the end of the file")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ConversionError(f"'{path}': header is not valid JSON ({e})")
    meta = header.pop("__metadata__", {}) or {}
    buf = data[8 + n:]
    out = []
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in NUMPY_OF:
            raise ConversionError(f"'{path}': tensor '{name}' has dtype {dt}, expected one of "
                                  + ", ".join(NUMPY_OF))
        b, e = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        a = np.frombuffer(buf[b:e], dtype=NUMPY_OF[dt])
        if a.size != int(np.prod(shape, dtype=np.int64)) or e > len(buf):
            raise ConversionError(f"'{path}': tensor '{name}': data_offsets [{b}, {e}] do not "
                                  f"hold shape {shape} of {dt}")
        t = torch.from_numpy(a.copy())
        if dt == "BF16":
            t = t.view(torch.bfloat16)
        out.append((name, t.reshape(shape)))
    return out, meta


# ------------------------------------------------------------------------------------------------
# PyTorch -> safetensors
# ------------------------------------------------------------------------------------------------

def load_state_dict(path):
    obj = torch.load(path, map_location="cpu")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConversionError(f"'{path}' holds {type(obj).__name__}, expected a state dict "
                              "(name -> tensor) or a dict with one under 'state_dict' or 'model'")
    return obj


def parse_channels(args):
    if args.channels is not None and args.channels_file is not None:
        raise ConversionError("give --channels or --channels-file, not both")
    if args.channels is not None:
        text = args.channels
    elif args.channels_file is not None:
        with open(args.channels_file, encoding="utf-8") as f:
            text = ",".join(line.strip() for line in f.read().splitlines() if line.strip())
    else:
        return None
    names = [n.strip() for n in text.split(",")]
    for i, n in enumerate(names):
        if not n:
            raise ConversionError(f"channel name {i} is empty, expected a non-empty name")
        if names.index(n) != i:
            raise ConversionError(f"channel name '{n}' appears twice, expected unique names")
    return names


def rename(name, prefixes, renames, rank):
    for p in prefixes:
        if name.startswith(p):
            name = name[len(p):]
    for old, new in renames:
        if name.startswith(old):
            name = new + name[len(old):]
    if rank is not None and name.startswith("partial.") and not re.match(r"^partial\.\d+\.", name):
        name = f"partial.{rank}." + name[len("partial."):]
    return name


def convert_to_safetensors(args):
    sd = load_state_dict(args.input)
    prefixes = args.prefix if args.prefix else DEFAULT_PREFIXES
    renames = []
    for r in args.rename:
        if "=" not in r:
            raise ConversionError(f"--rename '{r}': expected OLD=NEW")
        renames.append(tuple(r.split("=", 1)))
    channels = parse_channels(args)

    kept, dropped, seen = [], [], {}
    for original, t in sd.items():
        if not isinstance(t, torch.Tensor):
            dropped.append((original, None, "not a tensor"))
            continue
        if not t.is_floating_point():
            dropped.append((original, t, "not floating point"))
            continue
        name = rename(original, prefixes, renames, args.rank)
        if not DCHAG_NAME.match(name) and not args.keep_all:
            dropped.append((original, t, "not held by dchag"))
            continue
        if name in seen:
            raise ConversionError(f"'{original}' and '{seen[name]}' both become '{name}'")
        seen[name] = original
        if args.dtype != "keep":
            t = t.to(getattr(torch, CONVERT_TO[args.dtype]))
        kept.append((name, t))

    held = [n for n, _ in kept if DCHAG_NAME.match(n)]
    if not held:
        raise ConversionError(f"'{args.input}' holds no tensor dchag holds (after stripping "
                              f"{prefixes} and renaming); see --prefix and --rename")

    metadata = {}
    if channels is not None:
        if any("," in n for n in channels):
            raise ConversionError("channel names must not contain commas")
        shapes = {n: t.shape for n, t in kept}
        if "var_embed" in shapes:
            C = shapes["var_embed"][-2] if len(shapes["var_embed"]) >= 2 else 1
            what = f"var_embed {list(shapes['var_embed'])}"
        else:
            ids = {int(m.group(1)) for m in map(TOKEN_EMBED.match, shapes) if m}
            C = max(ids) + 1 if ids else 0
            what = "token_embeds.{c}"
        if len(channels) != C:
            raise ConversionError(f"{len(channels)} channel names given, expected C = {C} "
                                  f"(from {what})")
        metadata["channels"] = ",".join(channels)

    write_safetensors(args.output, kept, metadata)
    print(f"wrote {args.output}: {len(kept)} tensors"
          + (f", channels {metadata['channels']}" if channels else ""))
    for name, t in kept:
        src = seen[name]
        print(f"  kept {name} {list(t.shape)} {_st_dtype_of(t)}"
              + (f" (from {src})" if src != name else ""))
    if dropped:
        hint = "" if args.keep_all else " (keep those dchag does not hold with --keep-all)"
        print(f"left out {len(dropped)} tensors{hint}:")
        for name, t, why in dropped:
            desc = "" if t is None else f" {list(t.shape)} {str(t.dtype).replace('torch.', '')}"
            print(f"  dropped {name}{desc}: {why}")


# ------------------------------------------------------------------------------------------------
# safetensors -> PyTorch
# ------------------------------------------------------------------------------------------------

def convert_to_pytorch(args):
    tensors, meta = read_safetensors(args.input)
    sd = {}
    for name, t in tensors:
        sd[args.add_prefix + name] = t
    obj = {"state_dict": sd} if args.lightning else sd
    torch.save(obj, args.output)
    where = " under 'state_dict'" if args.lightning else ""
    print(f"wrote {args.output}: {len(sd)} tensors{where}")
    for k, v in meta.items():
        print(f"  metadata {k} = {v}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the top of this script for the names and the mapping.")
    ap.add_argument("input", help="PyTorch checkpoint (or safetensors file with --to-pytorch)")
    ap.add_argument("output", help="safetensors file to write (or .pt with --to-pytorch)")
    ap.add_argument("--to-pytorch", action="store_true", help="safetensors -> PyTorch state dict")
    ap.add_argument("--channels", help="comma-separated channel names, index = channel id")
    ap.add_argument("--channels-file", help="file of channel names (one per line or commas)")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16", "keep"], default="keep",
                    help="dtype of the written tensors (default: keep each tensor's)")
    ap.add_argument("--prefix", action="append", default=[],
                    help="strip this leading prefix (repeatable; default: net. then module.)")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="replace the leading OLD of a name by NEW after stripping (repeatable)")
    ap.add_argument("--rank", type=int, help="give partial.X without a rank index rank R")
    ap.add_argument("--keep-all", action="store_true", help="also keep tensors dchag does not hold")
    ap.add_argument("--add-prefix", default="", help="--to-pytorch: prefix added to every name")
    ap.add_argument("--lightning", action="store_true",
                    help="--to-pytorch: save {'state_dict': ...} as a Lightning checkpoint does")
    args = ap.parse_args(argv)
    if torch is None:
        print("convert_checkpoint.py: PyTorch is not importable (Debian: python3-torch, "
              "scripts/install-deps.sh)", file=sys.stderr)
        return 2
    try:
        if args.to_pytorch:
            convert_to_pytorch(args)
        else:
            convert_to_safetensors(args)
    except (ConversionError, OSError) as e:
        print(f"convert_checkpoint.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
