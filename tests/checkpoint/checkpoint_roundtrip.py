#!/usr/bin/python3
"""PyTorch -> safetensors -> dchag -> safetensors -> PyTorch, for a ClimaX-shaped and a
D-CHAG-shaped model (the ctest test checkpoint_roundtrip).

    /usr/bin/python3 tests/checkpoint/checkpoint_roundtrip.py --test-exe BUILD/tests/test_checkpoint
        --work-dir DIR

1. Builds small PyTorch modules with the parameter names of ClimaX (Conv2d(1, D, p, stride=p) per
   channel as token_embeds, nn.MultiheadAttention var_agg, var_embed, var_query, pos_embed) and of
   a D-CHAG model (artifact cross-attention partial aggregators per channel group and a final one,
   under other module names than dchag's), plus tensors dchag does not hold (blocks.0.attn.qkv.*,
   head.*, an integer buffer), with random float32 values; computes their front-end output in
   float64; saves them with torch.save as a plain state dict and as a Lightning checkpoint
   (`net.` prefix, under `state_dict`).
2. Converts both with scripts/convert_checkpoint.py, and checks what it keeps, drops and lists,
   --keep-all, --dtype f16/bf16, channel files and the errors it reports.
3. Runs the hidden case "[.roundtrip]" of test_checkpoint, which loads the converted files into a
   FlatFrontEnd and a DchagEmulation, compares their output with PyTorch's, and saves the weights.
4. Converts dchag's files back with --to-pytorch, loads them into fresh modules with
   load_state_dict, and requires every tensor dchag holds to be bit for bit the original F32 one.

Exits 77 (ctest: skipped) with a message when PyTorch cannot be imported.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts", "convert_checkpoint.py")
SKIP = 77

try:
    import torch
except ImportError:
    torch = None

B, H, W, P, D, HEADS = 2, 8, 8, 4, 8, 2
L = (H // P) * (W // P)


def fail(msg):
    print(f"checkpoint_roundtrip: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


# ------------------------------------------------------------------------------------------------
# The PyTorch models
# ------------------------------------------------------------------------------------------------

def make_modules():
    nn = torch.nn

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(1, D, kernel_size=P, stride=P)

        def forward(self, x):                                       # [B, 1, H, W] -> [B, L, D]
            return self.proj(x).flatten(2).transpose(1, 2)

    class Block(nn.Module):  # stands for the transformer that follows the front end
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(D, 3 * D)

    def aggregate(mha, query, x):
        """x [B, N, L, D] -> [B, L, D], as ClimaX's aggregate_variables."""
        b, n, l, d = x.shape
        xr = torch.einsum("bnld->blnd", x).flatten(0, 1)
        q = query.repeat_interleave(xr.shape[0], dim=0)
        out, _ = mha(q, xr, xr, need_weights=False)
        return out.squeeze(1).unflatten(0, (b, l))

    class ClimaXLike(nn.Module):
        def __init__(self, C):
            super().__init__()
            self.token_embeds = nn.ModuleList([PatchEmbed() for _ in range(C)])
            self.var_embed = nn.Parameter(torch.zeros(1, C, D))
            self.var_query = nn.Parameter(torch.zeros(1, 1, D))
            self.var_agg = nn.MultiheadAttention(D, HEADS, batch_first=True)
            self.pos_embed = nn.Parameter(torch.zeros(1, L, D))
            self.blocks = nn.ModuleList([Block()])
            self.head = nn.Linear(D, 2)
            self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))

        def forward(self, x):
            toks = torch.stack([e(x[:, c:c + 1]) + self.var_embed[0, c]
                                for c, e in enumerate(self.token_embeds)], dim=1)
            return aggregate(self.var_agg, self.var_query, toks) + self.pos_embed

    class ArtifactAttention(nn.Module):
        """The D-CHAG code's cross-attention: query, q and kv without biases, proj with one."""

        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.zeros(D))
            self.q = nn.Linear(D, D, bias=False)
            self.kv = nn.Linear(D, 2 * D, bias=False)
            self.proj = nn.Linear(D, D)

        def forward(self, x):                                       # [B, N, L, D] -> [B, L, D]
            b, n, l, d = x.shape
            hd = d // HEADS
            q = self.q(self.query).reshape(HEADS, hd)
            kv = self.kv(x)
            k = kv[..., :d].reshape(b, n, l, HEADS, hd)
            v = kv[..., d:].reshape(b, n, l, HEADS, hd)
            a = torch.softmax(torch.einsum("bnlhe,he->bnlh", k, q) / hd ** 0.5, dim=1)
            return self.proj(torch.einsum("bnlh,bnlhe->blhe", a, v).reshape(b, l, d))

    class DchagLike(nn.Module):
        """Channel groups [0, 1] and [2, 3]; the aggregators under names dchag does not use."""

        def __init__(self, C=4):
            super().__init__()
            self.token_embeds = nn.ModuleList([PatchEmbed() for _ in range(C)])
            self.var_embed = nn.Parameter(torch.zeros(1, C, D))
            self.agg_partial = nn.ModuleList([ArtifactAttention() for _ in range(2)])
            self.agg_final = ArtifactAttention()
            self.pos_embed = nn.Parameter(torch.zeros(1, L, D))
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            toks = torch.stack([e(x[:, c:c + 1]) + self.var_embed[0, c]
                                for c, e in enumerate(self.token_embeds)], dim=1)
            parts = [agg(toks[:, 2 * r:2 * r + 2]) for r, agg in enumerate(self.agg_partial)]
            return self.agg_final(torch.stack(parts, dim=1)) + self.pos_embed

    return ClimaXLike, DchagLike


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def run(args, expect_rc=0):
    p = subprocess.run([sys.executable, CONVERT] + args, capture_output=True, text=True)
    if p.returncode != expect_rc:
        fail(f"convert_checkpoint.py {' '.join(args)} exited {p.returncode}, expected {expect_rc}"
             f"\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p.stdout + p.stderr


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--test-exe", required=True)
    ap.add_argument("--work-dir", required=True)
    a = ap.parse_args()
    if torch is None:
        print("checkpoint_roundtrip: skipped: PyTorch is not importable by "
              f"{sys.executable} (Debian: python3-torch, scripts/install-deps.sh)")
        return SKIP
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(CONVERT))
    import convert_checkpoint as cc

    os.makedirs(a.work_dir, exist_ok=True)
    w = lambda name: os.path.join(a.work_dir, name)
    ClimaXLike, DchagLike = make_modules()
    channels = {"climax": ["t2m", "u10", "v10"], "dchag": ["b0", "b1", "b2", "b3"]}
    renames = ["--rename", "agg_partial.=partial.", "--rename", "agg_final.=final."]
    dropped = {"climax": ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "head.weight",
                          "head.bias", "steps"],
               "dchag": ["head.weight", "head.bias"]}
    models = {}
    for name, cls, seed in (("climax", ClimaXLike, 1), ("dchag", DchagLike, 2)):
        C = len(channels[name])
        m = cls() if name == "dchag" else cls(C)
        randomize(m, seed)
        models[name] = m
        images = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed + 10),
                             dtype=torch.float64)
        m64 = cls() if name == "dchag" else cls(C)
        m64.load_state_dict(m.state_dict())
        with torch.no_grad():
            out = m64.double()(images)
        cc.write_safetensors(w(f"{name}_reference.safetensors"), [("images", images), ("out", out)],
                             dict(C=C, H=H, W=W, p=P, D=D, heads=HEADS))
        sd = m.state_dict()
        torch.save(sd, w(f"{name}.pt"))
        torch.save({"epoch": 3, "state_dict": {"net." + k: v for k, v in sd.items()},
                    "optimizer_states": []}, w(f"{name}.ckpt"))
        with open(w(f"{name}_channels.txt"), "w") as f:
            f.write("\n".join(channels[name]) + "\n")

        extra = renames if name == "dchag" else []
        log = run([w(f"{name}.pt"), w(f"{name}.safetensors"),
                   "--channels", ",".join(channels[name])] + extra)
        for d in dropped[name]:
            check(f"dropped {d} " in log, f"{name}: '{d}' is not listed as dropped:\n{log}")
        run([w(f"{name}.ckpt"), w(f"{name}_lightning.safetensors"),
             "--channels-file", w(f"{name}_channels.txt")] + extra)
        # The same tensors, names and metadata: the same bytes, whichever way PyTorch saved them.
        with open(w(f"{name}.safetensors"), "rb") as f1, \
                open(w(f"{name}_lightning.safetensors"), "rb") as f2:
            check(f1.read() == f2.read(), f"{name}: the plain and Lightning conversions differ")
        tensors, meta = cc.read_safetensors(w(f"{name}.safetensors"))
        check(meta == {"channels": ",".join(channels[name])}, f"{name}: metadata {meta}")
        names = [n for n, _ in tensors]
        check(not any(n.startswith(("blocks.", "head.", "agg_")) or n == "steps" for n in names),
              f"{name}: kept {names}")
        if name == "dchag":
            check("partial.1.kv.weight" in names and "final.proj.bias" in names, f"{names}")

    # --keep-all keeps the transformer tensors, not the integer buffer; --dtype rounds as torch.
    log = run([w("climax.ckpt"), w("climax_all.safetensors"), "--keep-all"])
    t_all = dict(cc.read_safetensors(w("climax_all.safetensors"))[0])
    check("blocks.0.attn.qkv.weight" in t_all and "head.bias" in t_all and "steps" not in t_all,
          f"--keep-all kept {sorted(t_all)}")
    check("dropped net.steps [] int64: not floating point" in log, log)
    sd = models["climax"].state_dict()
    for dt, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        run([w("climax.pt"), w(f"climax_{dt}.safetensors"), "--dtype", dt])
        for n, t in cc.read_safetensors(w(f"climax_{dt}.safetensors"))[0]:
            check(t.dtype == tdt and torch.equal(t, sd[n].to(tdt)), f"--dtype {dt}: {n}")
    # Errors name what is wrong.
    err = run([w("climax.pt"), w("bad.safetensors"), "--channels", "a,b"], expect_rc=1)
    check("2 channel names given, expected C = 3" in err, err)
    err = run([w("climax.pt"), w("bad.safetensors"), "--channels", "a,a,b"], expect_rc=1)
    check("'a' appears twice" in err, err)
    err = run([w("dchag.pt"), w("bad.safetensors"), "--prefix", "nothing."], expect_rc=0)
    check("dropped agg_final.query" in err, "without --rename the D-CHAG aggregators are dropped")

    # The lead-time embedding and the tokenizer policies' tensors are dchag's too: kept.
    held = {"lead_time_embed.weight": [D, 1], "lead_time_embed.bias": [D],
            "token_embed.proj.weight": [D, 1, P, P], "token_embed.proj.bias": [D],
            "channel_embed.proj.weight": [D, 8], "channel_embed.proj.bias": [D],
            "pos_embed": [1, L, D]}
    torch.save({"net." + n: torch.ones(shape) for n, shape in held.items()}, w("policies.pt"))
    log = run([w("policies.pt"), w("policies.safetensors")])
    got = sorted(n for n, _ in cc.read_safetensors(w("policies.safetensors"))[0])
    check(got == sorted(held), f"policy and lead-time tensors: kept {got}:\n{log}")

    # A rank's own checkpoint: its partial aggregator gets the rank index.
    torch.save({"partial.query": torch.ones(D), "partial.kv.weight": torch.ones(2 * D, D),
                "final.query": torch.ones(D)}, w("rank1.pt"))
    run([w("rank1.pt"), w("rank1.safetensors"), "--rank", "1"])
    got = sorted(n for n, _ in cc.read_safetensors(w("rank1.safetensors"))[0])
    check(got == ["final.query", "partial.1.kv.weight", "partial.1.query"], f"--rank 1: {got}")

    # dchag loads, computes, saves.
    env = dict(os.environ, DCHAG_CHECKPOINT_DIR=a.work_dir)
    p = subprocess.run([a.test_exe, "[.roundtrip]"], env=env, capture_output=True, text=True)
    print(p.stdout[-3000:])
    check(p.returncode == 0, f"{a.test_exe} [.roundtrip] exited {p.returncode}:\n{p.stderr}")
    check("1 test case" in p.stdout, "the hidden test case did not run")

    # Back to PyTorch, bit for bit.
    for name in ("climax", "dchag"):
        log = run(["--to-pytorch", w(f"{name}_dchag.safetensors"), w(f"{name}_back.ckpt"),
                   "--add-prefix", "net.", "--lightning"])
        check(f"metadata channels = {','.join(channels[name])}" in log, log)
        back = torch.load(w(f"{name}_back.ckpt"))["state_dict"]
        original = models[name].state_dict()
        fresh = type(models[name])() if name == "dchag" else type(models[name])(3)
        inverse = {"partial.": "agg_partial.", "final.": "agg_final."} if name == "dchag" else {}
        sd_back = {}
        for k, v in back.items():
            k = k[len("net."):]
            for new, old in inverse.items():
                if k.startswith(new):
                    k = old + k[len(new):]
            sd_back[k] = v
        missing, unexpected = fresh.load_state_dict(sd_back, strict=False)
        check(not unexpected, f"{name}: unexpected {unexpected}")
        check(sorted(missing) == sorted(dropped[name]), f"{name}: missing {missing}")
        for k, v in sd_back.items():
            o = original[k]
            check(v.dtype == torch.float32 and v.shape == o.shape,
                  f"{name}: {k} is {v.dtype} {list(v.shape)}")
            check(torch.equal(v.view(torch.int32), o.contiguous().view(torch.int32)),
                  f"{name}: {k} differs from the original")
            check(torch.equal(fresh.state_dict()[k], o), f"{name}: {k} did not load")
        print(f"checkpoint_roundtrip: {name}: {len(sd_back)} tensors back bit for bit")
    print("checkpoint_roundtrip: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
