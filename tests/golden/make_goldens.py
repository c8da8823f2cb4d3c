#!/usr/bin/env python3
"""Regenerate the PyTorch golden files in this directory.

    python3 tests/golden/make_goldens.py [output_dir]

Needs PyTorch (Debian's python3-torch 1.13 is enough; CPU only) and numpy. The safetensors files
are written by this script itself (numpy + json), so the safetensors package is not needed.

Every file holds the inputs, the weights, the forward output `out`, the upstream gradient `grad_out`
and the gradient of loss = sum(out * grad_out) with respect to every input and weight, stored as
`grad.<name>`. See README.md for the conventions and the precision scheme.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch

torch.set_num_threads(1)  # reductions in a fixed order: the outputs are bit-for-bit reproducible
TOL = dict(rtol=1e-10, atol=1e-12)  # for the float64 cross-checks inside this script


# --------------------------------------------------------------------------------------------
# safetensors writer / reader (F32 only, which is all the goldens use)
# --------------------------------------------------------------------------------------------

def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, torch tensor); written as little-endian F32 in list order."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, t in tensors:
        assert name not in header, name
        a = np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4")
        assert np.all(np.isfinite(a)), name
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
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
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    buf = data[8 + n:]
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "F32"
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(buf[b:e], dtype="<f4").reshape(info["shape"])
    return out, meta


# --------------------------------------------------------------------------------------------
# Random values: drawn in float32, then used as float64 (exactly the stored values)
# --------------------------------------------------------------------------------------------

class Rng:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, shape, var):
        """N(0, var) drawn in float32 (var is the variance), returned as float64."""
        t = torch.randn(*shape, generator=self.g, dtype=torch.float32) * math.sqrt(var)
        return t.to(torch.float32).to(torch.float64)


class Golden:
    """Collects named float64 leaves (inputs and weights) in file order."""

    def __init__(self, rng):
        self.rng = rng
        self.leaves = []  # (name, tensor that receives .grad)
        self.extras = []  # (name, tensor): inputs without a gradient (masks)

    def leaf(self, name, shape, var):
        t = self.rng.normal(shape, var).requires_grad_(True)
        self.leaves.append((name, t))
        return t

    def param(self, name, p, var):
        """Fill an existing module Parameter (float64) with N(0, var) and register it."""
        with torch.no_grad():
            p.copy_(self.rng.normal(p.shape, var))
        self.leaves.append((name, p))
        return p

    def finish(self, path, out, metadata):
        grad_out = self.rng.normal(out.shape, 1.0)
        for _, t in self.leaves:
            t.grad = None
        loss = (out * grad_out).sum()
        loss.backward()
        tensors = [(n, t) for n, t in self.leaves] + self.extras
        tensors += [("out", out), ("grad_out", grad_out)]
        for n, t in self.leaves:
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            tensors.append(("grad." + n, g))
        write_safetensors(path, tensors, metadata)
        # Read back and compare: the file holds exactly what was computed, rounded to float32.
        back, meta = read_safetensors(path)
        assert meta == {k: str(v) for k, v in metadata.items()}
        for n, t in tensors:
            ref = t.detach().to(torch.float32).numpy()
            assert back[n].shape == ref.shape and np.array_equal(back[n], ref), n
        size = os.path.getsize(path)
        assert size < 100_000, (path, size)
        print(f"{os.path.basename(path)}: {len(tensors)} tensors, {size} bytes")


# --------------------------------------------------------------------------------------------
# Reference computations
# --------------------------------------------------------------------------------------------

def xattn_explicit(xr, qv, Wq, bq, Wk, bk, Wv, bv, Wo, bo, heads, valid=None):
    """DESIGN 3.2 written out: xr [M, N, D] rows of N tokens, qv [D] -> [M, D]; valid [M, N]
    (bool): a missing token's score is -inf (DESIGN 3.10)."""
    M, N, D = xr.shape
    hd = D // heads
    q = Wq @ qv + (bq if bq is not None else 0)                      # [D]
    k = xr @ Wk.T + (bk if bk is not None else 0)                    # [M, N, D]
    v = xr @ Wv.T + (bv if bv is not None else 0)                    # [M, N, D]
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        s = (k[:, :, sl] @ q[sl]) / math.sqrt(hd)                    # [M, N]
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        a = torch.softmax(s, dim=1)
        outs.append(torch.einsum("mn,mne->me", a, v[:, :, sl]))      # [M, hd]
    return torch.cat(outs, dim=1) @ Wo.T + bo


def to_rows(x):
    """[B, N, L, D] -> [B*L, N, D], row b*L + l (ClimaX aggregate_variables)."""
    B, N, L, D = x.shape
    return torch.einsum("bnld->blnd", x).flatten(0, 1)


def padding_mask(valid, L):
    """valid [B, N] (bool) -> nn.MultiheadAttention's key_padding_mask [B*L, N] (True: ignore),
    row b*L + l as to_rows."""
    B, N = valid.shape
    return (~valid)[:, None, :].expand(B, L, N).reshape(B * L, N)


def climax_aggregate(x, var_query, mha, valid=None):
    """ClimaX aggregate_variables: x [B, N, L, D] -> [B, L, D] with nn.MultiheadAttention;
    valid [B, N] (bool) masks tokens through key_padding_mask."""
    B, N, L, D = x.shape
    xr = to_rows(x)
    q = var_query.repeat_interleave(xr.shape[0], dim=0)              # [B*L, 1, D]
    kpm = None if valid is None else padding_mask(valid, L)
    out, _ = mha(q, xr, xr, need_weights=False, key_padding_mask=kpm)  # [B*L, 1, D]
    return out.squeeze(1).unflatten(0, (B, L))                       # squeeze(1): safe for B*L == 1


def check_climax_against_explicit(x, var_query, mha, valid=None):
    """Independent check of the ClimaX convention: nn.MultiheadAttention (forward and all
    gradients, key_padding_mask for `valid`) equals the explicit math of DESIGN 3.2 with in_proj
    split as [Wq; Wk; Wv]."""
    D = x.shape[-1]
    x = x.detach().clone().requires_grad_(True)  # keep the caller's graph untouched
    leaves = [x, var_query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
              mha.out_proj.bias]
    c = [t.detach().clone().requires_grad_(True) for t in leaves]
    Win, bin_ = c[2], c[3]
    rows_valid = None if valid is None else ~padding_mask(valid, x.shape[2])
    queries = c[1].reshape(-1, D)  # several queries (DESIGN 3.9): one explicit fold each
    ref = torch.stack([xattn_explicit(to_rows(c[0]), qv, Win[:D], bin_[:D], Win[D:2 * D],
                                      bin_[D:2 * D], Win[2 * D:], bin_[2 * D:], c[4], c[5],
                                      mha.num_heads, rows_valid) for qv in queries], dim=1)
    ref = ref.unflatten(0, (x.shape[0], x.shape[2]))
    if queries.shape[0] == 1:
        ref = ref.squeeze(2)
    got = climax_aggregate(x, var_query, mha, valid)
    assert torch.allclose(got, ref, **TOL)
    go = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g1 = torch.autograd.grad((got * go).sum(), leaves)
    g2 = torch.autograd.grad((ref * go).sum(), c)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, **TOL)


class Artifact:
    """D-CHAG artifact cross-attention: query [D] ([Nq, D] with several queries, as UCF-VIT's
    VariableMapping_Attention), q (no bias), kv (no bias; rows [K; V]), proj (with bias)."""

    def __init__(self, g, prefix, D, heads, queries=1):
        self.D, self.heads, self.prefix, self.queries = D, heads, prefix, queries
        self.query = g.leaf(prefix + "query", [D] if queries == 1 else [queries, D], 1.0)
        self.Wq = g.leaf(prefix + "q.weight", [D, D], 1.0 / D)
        self.Wkv = g.leaf(prefix + "kv.weight", [2 * D, D], 1.0 / D)
        self.Wp = g.leaf(prefix + "proj.weight", [D, D], 1.0 / D)
        self.bp = g.leaf(prefix + "proj.bias", [D], 0.1)

    def __call__(self, x, valid=None):
        """x [B, N, L, D] -> [B, L, D]; valid [B, N] (bool) masks tokens."""
        B, N, L, D = x.shape
        nh, hd = self.heads, D // self.heads
        if self.queries > 1:  # [B, L, Nq, D]
            q = (self.query @ self.Wq.T).reshape(self.queries, nh, hd)
            kv = x @ self.Wkv.T
            k = kv[..., :D].reshape(B, N, L, nh, hd)
            v = kv[..., D:].reshape(B, N, L, nh, hd)
            s = torch.einsum("bnlhe,qhe->bnlqh", k, q) / math.sqrt(hd)
            if valid is not None:
                s = s.masked_fill(~valid[:, :, None, None, None], float("-inf"))
            a = torch.softmax(s, dim=1)
            o = torch.einsum("bnlqh,bnlhe->blqhe", a, v).reshape(B, L, self.queries, D)
            return o @ self.Wp.T + self.bp
        q = (self.Wq @ self.query).reshape(nh, hd)
        kv = x @ self.Wkv.T                                          # [B, N, L, 2D]
        k = kv[..., :D].reshape(B, N, L, nh, hd)
        v = kv[..., D:].reshape(B, N, L, nh, hd)
        s = torch.einsum("bnlhe,he->bnlh", k, q) / math.sqrt(hd)
        if valid is not None:
            s = s.masked_fill(~valid[:, :, None, None], float("-inf"))
        a = torch.softmax(s, dim=1)
        o = torch.einsum("bnlh,bnlhe->blhe", a, v).reshape(B, L, D)
        return o @ self.Wp.T + self.bp

    def check(self, x, valid=None):
        """Independent check: the same weights in nn.MultiheadAttention (in_proj = [Wq; Wkv],
        zero in_proj bias, out_proj = proj; key_padding_mask) give the same output and input
        gradient."""
        D = self.D
        mha = torch.nn.MultiheadAttention(D, self.heads, batch_first=True).double()
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.Wq, self.Wkv]))
            mha.in_proj_bias.zero_()
            mha.out_proj.weight.copy_(self.Wp)
            mha.out_proj.bias.copy_(self.bp)
        x1 = x.detach().clone().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        ref = climax_aggregate(x1, self.query.detach().reshape(1, self.queries, D), mha, valid)
        got = self(x2, valid)
        assert torch.allclose(got, ref, **TOL)
        go = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (ga,) = torch.autograd.grad((got * go).sum(), [x2])
        (gb,) = torch.autograd.grad((ref * go).sum(), [x1])
        assert torch.allclose(ga, gb, **TOL)


class Climax:
    """ClimaX's aggregation as a module under `prefix`: var_query [1, 1, D] and var_agg
    (nn.MultiheadAttention), x [B, N, L, D] -> [B, L, D]."""

    def __init__(self, g, prefix, D, heads):
        self.mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).double()
        self.var_query = g.leaf(prefix + "var_query", [1, 1, D], 1.0)
        g.param(prefix + "var_agg.in_proj_weight", self.mha.in_proj_weight, 1.0 / D)
        g.param(prefix + "var_agg.in_proj_bias", self.mha.in_proj_bias, 0.1)
        g.param(prefix + "var_agg.out_proj.weight", self.mha.out_proj.weight, 1.0 / D)
        g.param(prefix + "var_agg.out_proj.bias", self.mha.out_proj.bias, 0.1)

    def __call__(self, x, valid=None):
        return climax_aggregate(x, self.var_query, self.mha, valid)

    def check(self, x, valid=None):
        check_climax_against_explicit(x, self.var_query, self.mha, valid)


class Tokenizer:
    """ClimaX token_embeds (one Conv2d(1, D, p, stride=p) per model channel) + var_embed."""

    def __init__(self, g, C, D, p):
        self.D, self.p = D, p
        self.convs = []
        for c in range(C):
            conv = torch.nn.Conv2d(1, D, kernel_size=p, stride=p).double()
            g.param(f"token_embeds.{c}.proj.weight", conv.weight, 1.0 / (p * p))
            g.param(f"token_embeds.{c}.proj.bias", conv.bias, 0.1)
            self.convs.append(conv)
        self.var_embed = g.leaf("var_embed", [1, C, D], 1.0)

    def __call__(self, images, ids):
        """images [B, Cin, H, W], ids[j] = model channel of input channel j -> [B, Cin, L, D]."""
        toks = [self.convs[c](images[:, j:j + 1]).flatten(2).transpose(1, 2)
                + self.var_embed[0, c] for j, c in enumerate(ids)]
        return torch.stack(toks, dim=1)

    def check(self, images, ids, tokens):
        """Independent check of DESIGN 3.1: patch l = row-major over (H/p, W/p), pixels row-major
        inside the patch, token = W_c [D, p*p] . patch + b_c + E[c]."""
        B, Cin, H, W = images.shape
        p, hp, wp = self.p, H // self.p, W // self.p
        with torch.no_grad():
            for b in range(B):
                for j, c in enumerate(ids):
                    Wt = self.convs[c].weight.reshape(self.D, p * p)
                    for l in range(hp * wp):
                        i0, j0 = (l // wp) * p, (l % wp) * p
                        patch = images[b, j, i0:i0 + p, j0:j0 + p].reshape(p * p)
                        ref = Wt @ patch + self.convs[c].bias + self.var_embed[0, c]
                        assert torch.allclose(tokens[b, j, l], ref, **TOL)


def fourier_features(x, F, lo, hi):
    """Aurora's FourierExpansion (levels_expansion): x [N] -> [N, F], F // 2 wavelengths from lo
    to hi on a geometric ladder (torch.logspace), sines then cosines of x * 2 pi / wavelength."""
    wavelengths = torch.logspace(math.log10(lo), math.log10(hi), F // 2, base=10,
                                 dtype=torch.float64)
    prod = torch.einsum("i,j->ij", x, 2 * np.pi / wavelengths)
    return torch.cat((torch.sin(prod), torch.cos(prod)), dim=-1)


class PolicyTokenizer:
    """The tokenizer policies of DESIGN 3.11. Weights: one Conv2d per channel (ClimaX
    token_embeds) or one shared by all (ChannelViT: token_embed.proj). Channel embedding: the
    var_embed table or channel_embed.proj (nn.Linear(F, D)) of the Fourier features of the
    channel's coordinate (fourier = (F, lo, hi)). Channels are given by model id, or by
    coordinate alone (id -1: a channel the model was not built with)."""

    def __init__(self, g, C, D, p, shared, coords=None, fourier=None):
        self.D, self.p, self.shared, self.coords, self.fourier = D, p, shared, coords, fourier
        if shared:
            self.conv = torch.nn.Conv2d(1, D, kernel_size=p, stride=p).double()
            g.param("token_embed.proj.weight", self.conv.weight, 1.0 / (p * p))
            g.param("token_embed.proj.bias", self.conv.bias, 0.1)
        else:
            self.convs = []
            for c in range(C):
                conv = torch.nn.Conv2d(1, D, kernel_size=p, stride=p).double()
                g.param(f"token_embeds.{c}.proj.weight", conv.weight, 1.0 / (p * p))
                g.param(f"token_embeds.{c}.proj.bias", conv.bias, 0.1)
                self.convs.append(conv)
        if coords is None:
            self.var_embed = g.leaf("var_embed", [1, C, D], 1.0)
        else:
            F = fourier[0]
            self.proj = torch.nn.Linear(F, D).double()
            g.param("channel_embed.proj.weight", self.proj.weight, 1.0 / F)
            g.param("channel_embed.proj.bias", self.proj.bias, 0.1)

    def conv_of(self, c):
        assert self.shared or c >= 0
        return self.conv if self.shared else self.convs[c]

    def embeds(self, ids, sel_coords):
        """[J, D]: the embedding of every input channel."""
        if self.coords is None:
            return torch.stack([self.var_embed[0, c] for c in ids])
        x = torch.tensor([self.coords[c] if c >= 0 else sel_coords[j] for j, c in enumerate(ids)],
                         dtype=torch.float64)
        return self.proj(fourier_features(x, *self.fourier))

    def __call__(self, images, ids, sel_coords=None):
        e = self.embeds(ids, sel_coords)
        toks = [self.conv_of(c)(images[:, j:j + 1]).flatten(2).transpose(1, 2) + e[j]
                for j, c in enumerate(ids)]
        return torch.stack(toks, dim=1)

    def check(self, images, ids, sel_coords, tokens):
        """Independent check: token = W [D, p*p] . patch + b + e, with e from the formula of
        dchag/tokenizer_policy.hpp written out element by element."""
        B, Cin, H, W = images.shape
        p, hp, wp = self.p, H // self.p, W // self.p
        with torch.no_grad():
            for j, c in enumerate(ids):
                if self.coords is None:
                    e = self.var_embed[0, c]
                else:
                    F, lo, hi = self.fourier
                    n = F // 2
                    x = self.coords[c] if c >= 0 else sel_coords[j]
                    lam = [10 ** (math.log10(lo) + k * (math.log10(hi) - math.log10(lo)) /
                                  max(n - 1, 1)) for k in range(n)]
                    phi = torch.tensor([math.sin(x * 2 * math.pi / v) for v in lam] +
                                       [math.cos(x * 2 * math.pi / v) for v in lam],
                                       dtype=torch.float64)
                    e = self.proj.weight @ phi + self.proj.bias
                conv = self.conv_of(c)
                Wt = conv.weight.reshape(self.D, p * p)
                for b in range(B):
                    for l in range(hp * wp):
                        i0, j0 = (l // wp) * p, (l % wp) * p
                        patch = images[b, j, i0:i0 + p, j0:j0 + p].reshape(p * p)
                        ref = Wt @ patch + conv.bias + e
                        assert torch.allclose(tokens[b, j, l], ref, **TOL)


def floats(seq):
    return ",".join(repr(float(x)) for x in seq)


def policy_meta(shared, coords, fourier):
    meta = dict(tokenizer="shared" if shared else "per_channel",
                channel_embedding="table" if coords is None else "coordinate")
    if coords is not None:
        meta["coordinates"] = floats(coords)
        meta["fourier"] = floats(fourier)
    return meta


# Storage types (DESIGN 3.12): images and tokens held in bf16 or fp16, arithmetic in float64 here.
STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RoundTo(torch.autograd.Function):
    """Rounds to a storage type in the forward, through float32 as dchag narrows its results;
    the identity in the backward (straight-through, as mixed-precision training does)."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(torch.float32).to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def stored(x, storage):
    return x if storage is None else RoundTo.apply(x, STORAGE[storage])


def stored_leaf(g, name, shape, var, storage):
    """An input leaf whose values are already those of the storage type."""
    t = g.leaf(name, shape, var)
    if storage is not None:
        with torch.no_grad():
            t.copy_(stored(t, storage))
    return t


def ints(seq):
    return ",".join(str(int(i)) for i in seq)


# --------------------------------------------------------------------------------------------
# The golden files
# --------------------------------------------------------------------------------------------

def mask_extra(g, mask):
    """The validity mask [B, C] (DESIGN 3.10) as a bool tensor, stored as `mask` (1.0 valid, 0.0
    missing); None stays None."""
    if mask is None:
        return None
    m = torch.tensor(mask, dtype=torch.float64)
    g.extras.append(("mask", m))
    return m > 0.5


def masked_fold(fold, t, valid):
    """fold(t, valid) for t [B, N, L, D] where a sample may hold no valid input: that sample
    gets zeros (dchag gives a bias-only token there; either way its slot is masked one level up),
    computed with every input unmasked so that no NaN enters the graph."""
    if valid is None:
        return fold(t, None)
    empty = ~valid.any(dim=1)
    y = fold(t, valid | empty[:, None])
    return torch.where(empty[:, None, None], torch.zeros_like(y), y)


def with_queries(out, meta, queries):
    """Several queries (DESIGN 3.9): out [B, L, Nq, D] stored as [B, L, Nq * D], the bytes dchag
    writes, and metadata `queries`."""
    if queries == 1:
        return out
    meta["queries"] = queries
    return out.flatten(-2)


def xattn_climax(path, seed, B, N, L, D, heads, mask=None, queries=1):
    g = Golden(Rng(seed))
    x = g.leaf("x", [B, N, L, D], 1.0)
    valid = mask_extra(g, mask)
    mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).double()
    var_query = g.leaf("var_query", [1, queries, D], 1.0)
    g.param("var_agg.in_proj_weight", mha.in_proj_weight, 1.0 / D)
    g.param("var_agg.in_proj_bias", mha.in_proj_bias, 0.1)
    g.param("var_agg.out_proj.weight", mha.out_proj.weight, 1.0 / D)
    g.param("var_agg.out_proj.bias", mha.out_proj.bias, 0.1)
    check_climax_against_explicit(x, var_query, mha, valid)
    out = climax_aggregate(x, var_query, mha, valid)
    meta = dict(kind="xattn", convention="climax", B=B, N=N, L=L, D=D, heads=heads, seed=seed)
    g.finish(path, with_queries(out, meta, queries), meta)


def xattn_artifact(path, seed, B, N, L, D, heads, prefix, queries=1):
    g = Golden(Rng(seed))
    x = g.leaf("x", [B, N, L, D], 1.0)
    att = Artifact(g, prefix, D, heads, queries)
    att.check(x)
    out = att(x)
    meta = dict(kind="xattn", convention="artifact", prefix=prefix, B=B, N=N, L=L, D=D,
                heads=heads, seed=seed)
    g.finish(path, with_queries(out, meta, queries), meta)


def lead_time_stage(g, B, D):
    """ClimaX's lead_time_embed (nn.Linear(1, D)) and the lead times of the samples (leaf
    `lead_times` [B]); returns f(x) = x + lead_time_embed(lead_times.unsqueeze(-1)).unsqueeze(1)."""
    lin = torch.nn.Linear(1, D).double()
    g.param("lead_time_embed.weight", lin.weight, 1.0)
    g.param("lead_time_embed.bias", lin.bias, 0.1)
    lead_times = g.leaf("lead_times", [B], 1.0)
    return lambda x: x + lin(lead_times.unsqueeze(-1)).unsqueeze(1)


def flat(path, seed, B, C, H, W, p, D, heads, ids, storage=None, lead_time=False, policy=None,
         sel_coords=None, mask=None, queries=1):
    """policy: None (ClimaX's tokenizer) or (shared, coords, fourier) of PolicyTokenizer;
    sel_coords: the coordinate of every input channel (ids -1 are channels the model lacks);
    mask: [B, C] channel validity (DESIGN 3.10)."""
    g = Golden(Rng(seed))
    L = (H // p) * (W // p)
    images = stored_leaf(g, "images", [B, len(ids), H, W], 1.0, storage)
    valid = mask_extra(g, mask)
    valid = None if valid is None else valid[:, ids]
    tok = Tokenizer(g, C, D, p) if policy is None else PolicyTokenizer(g, C, D, p, *policy)
    mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).double()
    var_query = g.leaf("var_query", [1, queries, D], 1.0)
    g.param("var_agg.in_proj_weight", mha.in_proj_weight, 1.0 / D)
    g.param("var_agg.in_proj_bias", mha.in_proj_bias, 0.1)
    g.param("var_agg.out_proj.weight", mha.out_proj.weight, 1.0 / D)
    g.param("var_agg.out_proj.bias", mha.out_proj.bias, 0.1)
    pos_embed = g.leaf("pos_embed", [1, L, D], 1.0)
    if policy is None:
        tokens = tok(images, ids)
        tok.check(images, ids, tokens)
    else:
        tokens = tok(images, ids, sel_coords)
        tok.check(images, ids, sel_coords, tokens)
    tokens = stored(tokens, storage)
    check_climax_against_explicit(tokens, var_query, mha, valid)
    out = climax_aggregate(tokens, var_query, mha, valid)
    out = out + (pos_embed if queries == 1 else pos_embed.unsqueeze(2))  # every query's token
    if lead_time:
        out = lead_time_stage(g, B, D)(out)
    meta = dict(kind="flat", convention="climax", B=B, L=L, D=D, heads=heads, C=C, H=H, W=W, p=p,
                channel_ids=ints(ids), seed=seed)
    out = with_queries(out, meta, queries)
    if lead_time:
        meta["lead_time"] = 1
    if storage is not None:
        meta["storage"] = storage
    if policy is not None:
        meta.update(policy_meta(*policy))
    if sel_coords is not None:
        meta["selection_coordinates"] = floats(sel_coords)
    g.finish(path, out, meta)


def block_sizes(C, P):
    """Contiguous blocks; the first C % P ranks hold one extra channel."""
    return [C // P + (1 if r < C % P else 0) for r in range(P)]


def dchag(path, seed, partial, tree, P, C, B, H, W, p, D, heads, storage=None,
          partial_convention="artifact", lead_time=False, policy=None, mask=None, queries=1):
    g = Golden(Rng(seed))
    L = (H // p) * (W // p)
    sizes = block_sizes(C, P)
    starts = np.cumsum([0] + sizes)
    images = stored_leaf(g, "images", [B, C, H, W], 1.0, storage)
    valid = mask_extra(g, mask)
    if valid is None:
        valid = torch.ones(B, C, dtype=torch.bool)
        mask_given = False
    else:
        mask_given = True
    weight = lambda v: v.to(torch.float64)  # a linear sum's mask: missing inputs add nothing
    tok = Tokenizer(g, C, D, p) if policy is None else PolicyTokenizer(g, C, D, p, *policy)

    partials = []
    for r in range(P):
        pre, Cr = f"partial.{r}.", sizes[r]
        if partial == "linear":
            if tree == 1:
                w = g.leaf(pre + "weight", [Cr], 1.0 / Cr)
                b = g.leaf(pre + "bias", [1], 0.1)
                partials.append(lambda t, v, w=w, b=b:
                                torch.einsum("bcld,c,bc->bld", t, w, weight(v)) + b)
            else:
                assert Cr % tree == 0, "the linear tree needs equal subgroups"
                w = g.leaf(pre + "weight", [Cr // tree], tree / Cr)
                b = g.leaf(pre + "bias", [1], 0.1)
                tw = g.leaf(pre + "top_weight", [tree], 1.0 / tree)
                tb = g.leaf(pre + "top_bias", [1], 0.1)

                def lin_tree(t, v, w=w, b=b, tw=tw, tb=tb, k=tree):
                    m = t.shape[1] // k
                    gs = [torch.einsum("bcld,c,bc->bld", t[:, j * m:(j + 1) * m], w,
                                       weight(v[:, j * m:(j + 1) * m])) + b for j in range(k)]
                    gv = torch.stack([v[:, j * m:(j + 1) * m].any(dim=1) for j in range(k)], 1)
                    return torch.einsum("bkld,k,bk->bld", torch.stack(gs, dim=1), tw,
                                        weight(gv)) + tb
                partials.append(lin_tree)
        else:
            att = (Artifact if partial_convention == "artifact" else Climax)(g, pre, D, heads)
            if tree == 1:
                partials.append(lambda t, v, att=att: masked_fold(att, t, v))
            else:
                def att_tree(t, v, att=att, k=tree):
                    groups = [slice(int(ix[0]), int(ix[-1]) + 1)
                              for ix in np.array_split(np.arange(t.shape[1]), k)]
                    gs = [masked_fold(att, t[:, sl], v[:, sl]) for sl in groups]
                    gv = torch.stack([v[:, sl].any(dim=1) for sl in groups], dim=1)
                    return masked_fold(att, torch.stack(gs, dim=1), gv)
                partials.append(att_tree)

    final = Artifact(g, "final.", D, heads, queries)
    pos_embed = g.leaf("pos_embed", [1, L, D], 1.0)

    ids = list(range(C))
    tokens = tok(images, ids)
    if policy is None:
        tok.check(images, ids, tokens)
    else:
        tok.check(images, ids, None, tokens)
    tokens = stored(tokens, storage)
    ys = [partials[r](tokens[:, starts[r]:starts[r + 1]], valid[:, starts[r]:starts[r + 1]])
          for r in range(P)]
    gathered = torch.stack(ys, dim=1)                                # [B, P, L, D], rank order
    # A rank with no valid channel in a sample has no slot in its final fold.
    slots = torch.stack([valid[:, starts[r]:starts[r + 1]].any(dim=1) for r in range(P)], dim=1)
    slots = slots if mask_given else None
    final.check(gathered, slots)
    out = final(gathered, slots) + (pos_embed if queries == 1 else pos_embed.unsqueeze(2))
    if lead_time:
        out = lead_time_stage(g, B, D)(out)
    meta = dict(kind="dchag", convention="artifact", partial=partial, tree=tree, groups=P,
                map="blocks", channels_per_rank=ints(sizes), B=B, L=L, D=D, heads=heads, C=C, H=H,
                W=W, p=p, channel_ids=ints(ids), seed=seed)
    out = with_queries(out, meta, queries)
    if storage is not None:
        meta["storage"] = storage
    if partial_convention != "artifact":
        meta["partial_convention"] = partial_convention
    if lead_time:
        meta["lead_time"] = 1
    if policy is not None:
        meta.update(policy_meta(*policy))
    g.finish(path, out, meta)


# ClimaX's / MAE's sin-cos initialisers, as they are written there (numpy, float64).
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size_h, grid_size_w):
    grid_h = np.arange(grid_size_h, dtype=np.float32)
    grid_w = np.arange(grid_size_w, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size_h, grid_size_w])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def init_climax(path, C, H, W, p, D):
    """The fresh pos_embed and var_embed of a ClimaX model (no gradients: kind "init")."""
    gh, gw = H // p, W // p
    pos = torch.from_numpy(get_2d_sincos_pos_embed(D, gh, gw)).reshape(1, gh * gw, D)
    var = torch.from_numpy(get_1d_sincos_pos_embed_from_grid(D, np.arange(C))).reshape(1, C, D)
    meta = dict(kind="init", convention="climax", C=C, H=H, W=W, p=p, D=D, L=gh * gw)
    write_safetensors(path, [("pos_embed", pos), ("var_embed", var)], meta)
    print(f"{os.path.basename(path)}: 2 tensors, {os.path.getsize(path)} bytes")


def warmup_cosine(step, base_lr, warmup_steps, max_steps, warmup_start_lr, eta_min):
    """The closed form of pl_bolts' LinearWarmupCosineAnnealingLR (ClimaX's schedule)."""
    if step < warmup_steps:
        return warmup_start_lr + step * (base_lr - warmup_start_lr) / max(1, warmup_steps - 1)
    if step >= max_steps:
        return eta_min
    return eta_min + 0.5 * (base_lr - eta_min) * (
        1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))


def adamw(path, seed, steps=5):
    """torch.optim.AdamW in float32 over ClimaX-named tensors, ClimaX's decay groups (no decay
    on embeddings and queries), for `steps` steps of a warmup-cosine schedule on given gradients.
    The file holds the initial parameters `param.<n>`, the gradients `grad.<k>.<n>`, the learning
    rates `lr` [steps] and, after the last step, `final.<n>`, `exp_avg.<n>`, `exp_avg_sq.<n>`."""
    rng = Rng(seed)
    shapes = {"var_embed": [1, 3, 4], "token_embeds.0.proj.weight": [4, 1, 2, 2],
              "var_query": [1, 1, 4], "var_agg.out_proj.bias": [4], "final.query": [4]}
    decays = {"var_embed": False, "token_embeds.0.proj.weight": True, "var_query": False,
              "var_agg.out_proj.bias": True, "final.query": False}
    cfg = dict(base_lr=1e-2, warmup_steps=2, max_steps=steps, warmup_start_lr=1e-3, eta_min=1e-4)
    params = {n: torch.nn.Parameter(rng.normal(s, 1.0).to(torch.float32)) for n, s in shapes.items()}
    tensors = [("param." + n, p.detach().clone()) for n, p in params.items()]
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params.items() if decays[n]], "weight_decay": 0.05},
         {"params": [p for n, p in params.items() if not decays[n]], "weight_decay": 0.0}],
        lr=cfg["base_lr"], betas=(0.9, 0.95), eps=1e-8)
    lrs = []
    for k in range(steps):
        lr = warmup_cosine(k, **cfg)
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in params.items():
            p.grad = rng.normal(shapes[n], 1.0).to(torch.float32)
            tensors.append((f"grad.{k}.{n}", p.grad.clone()))
        opt.step()
    tensors.append(("lr", torch.tensor(lrs, dtype=torch.float64)))
    for n, p in params.items():
        st = opt.state[p]
        tensors += [("final." + n, p.detach()), ("exp_avg." + n, st["exp_avg"]),
                    ("exp_avg_sq." + n, st["exp_avg_sq"])]
    meta = dict(kind="adamw", steps=steps, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05,
                names=",".join(shapes), seed=seed, **cfg)
    write_safetensors(path, tensors, meta)
    print(f"{os.path.basename(path)}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    f = lambda name: os.path.join(out_dir, name + ".safetensors")

    xattn_climax(f("xattn_climax_basic"), 101, B=2, N=5, L=3, D=16, heads=4)
    xattn_climax(f("xattn_climax_nh1"), 102, B=1, N=4, L=2, D=12, heads=1)
    xattn_climax(f("xattn_climax_d20"), 103, B=2, N=7, L=2, D=20, heads=5)
    xattn_climax(f("xattn_climax_c1"), 104, B=2, N=1, L=3, D=8, heads=2)
    xattn_climax(f("xattn_climax_bl1"), 105, B=1, N=6, L=1, D=16, heads=2)
    xattn_artifact(f("xattn_artifact_basic"), 106, B=2, N=5, L=3, D=16, heads=4, prefix="agg.")
    flat(f("flat_all"), 107, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[0, 1, 2, 3, 4, 5])
    flat(f("flat_subset"), 108, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[4, 1, 3])
    dchag(f("dchag_linear"), 109, "linear", tree=1, P=3, C=7, B=2, H=8, W=8, p=4, D=16, heads=4)
    dchag(f("dchag_xattn_tree"), 110, "xattn", tree=2, P=2, C=8, B=2, H=8, W=8, p=4, D=16,
          heads=4)
    dchag(f("dchag_linear_tree"), 111, "linear", tree=2, P=2, C=8, B=2, H=8, W=8, p=4, D=16,
          heads=4)
    dchag(f("dchag_xattn_uneven"), 112, "xattn", tree=1, P=3, C=7, B=1, H=4, W=8, p=4, D=12,
          heads=3)
    flat(f("flat_bf16"), 113, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[0, 1, 2, 3, 4, 5],
         storage="bf16")
    flat(f("flat_fp16_subset"), 114, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[4, 1, 3],
         storage="fp16")
    dchag(f("dchag_xattn_bf16"), 115, "xattn", tree=2, P=2, C=8, B=2, H=8, W=8, p=4, D=16,
          heads=4, storage="bf16")
    dchag(f("dchag_linear_fp16"), 116, "linear", tree=1, P=3, C=7, B=2, H=8, W=8, p=4, D=16,
          heads=4, storage="fp16")
    init_climax(f("init_climax"), C=5, H=12, W=16, p=4, D=12)
    dchag(f("dchag_xattn_climax_partials"), 117, "xattn", tree=2, P=2, C=8, B=2, H=8, W=8, p=4,
          D=16, heads=4, partial_convention="climax")
    flat(f("flat_lead_time"), 118, B=3, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[2, 5, 0, 4],
         lead_time=True)
    dchag(f("dchag_linear_lead_time"), 119, "linear", tree=1, P=3, C=7, B=2, H=8, W=8, p=4, D=16,
          heads=4, lead_time=True)
    # Masks (DESIGN 3.10): 1 valid, 0 missing, over the model's channels [B, C].
    xattn_climax(f("xattn_climax_mask"), 120, B=2, N=5, L=3, D=16, heads=4,
                 mask=[[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]])
    flat(f("flat_mask"), 121, B=3, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[4, 0, 2, 3],
         mask=[[1, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    # Sample 0: rank 1 (channels 3, 4) has none; sample 1: rank 0's second group (channel 2)
    # has none; sample 2: one channel missing per rank.
    dchag(f("dchag_xattn_mask"), 122, "xattn", tree=2, P=3, C=7, B=3, H=8, W=8, p=4, D=16,
          heads=4, mask=[[1, 0, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 1, 0], [1, 1, 0, 1, 0, 0, 1]])
    dchag(f("dchag_xattn_climax_mask"), 123, "xattn", tree=1, P=3, C=7, B=2, H=4, W=8, p=4,
          D=12, heads=3, partial_convention="climax",
          mask=[[0, 0, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 0]])
    # Sample 0: rank 1 (channels 4..7) has none; sample 1: rank 0's first group (0, 1) has none.
    adamw(f("adamw"), 125)
    # Several learned queries (DESIGN 3.9; ClimaX's aggregated_variables, UCF-VIT's shape).
    xattn_climax(f("xattn_climax_queries"), 126, B=2, N=5, L=3, D=16, heads=4, queries=3,
                 mask=[[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    xattn_artifact(f("xattn_artifact_queries"), 127, B=2, N=4, L=2, D=12, heads=3, prefix="agg.",
                   queries=2)
    flat(f("flat_queries"), 128, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[4, 1, 3, 0],
         queries=3)
    dchag(f("dchag_xattn_queries"), 129, "xattn", tree=2, P=2, C=8, B=2, H=8, W=8, p=4, D=16,
          heads=4, queries=2, mask=[[1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1, 1]])
    dchag(f("dchag_linear_mask"), 124, "linear", tree=2, P=2, C=8, B=2, H=8, W=8, p=4, D=16,
          heads=4, mask=[[1, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1]])
    # Tokenizer policies (DESIGN 3.11): ChannelViT's shared tokenizer with the table; a shared
    # tokenizer with coordinate embeddings (pressure levels in hPa) taking two channels the model
    # was not built with (ids -1); D-CHAG with coordinate embeddings, per-channel and shared.
    levels = [50.0, 150.0, 250.0, 500.0, 700.0, 850.0, 1000.0]
    fourier = (8, 10.0, 10000.0)
    flat(f("flat_shared_tokenizer"), 120, B=2, C=6, H=8, W=12, p=4, D=16, heads=4, ids=[4, 1, 3],
         policy=(True, None, None))
    flat(f("flat_coordinate_new_channels"), 121, B=2, C=5, H=8, W=12, p=4, D=16, heads=4,
         ids=[3, -1, 0, -1], policy=(True, levels[:5], fourier),
         sel_coords=[500.0, 333.0, 50.0, 925.0])
    dchag(f("dchag_xattn_coordinate"), 122, "xattn", tree=1, P=3, C=7, B=2, H=8, W=8, p=4, D=16,
          heads=4, policy=(False, levels, fourier))
    dchag(f("dchag_linear_shared_coordinate"), 123, "linear", tree=1, P=3, C=7, B=2, H=8, W=8,
          p=4, D=16, heads=4, policy=(True, levels, fourier))


if __name__ == "__main__":
    main()
