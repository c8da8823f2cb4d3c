#!/usr/bin/python3
"""Times the ClimaX flat front end in PyTorch, the reference dchag's FlatFrontEnd is compared with.

The model is ClimaX's: one Conv2d(1, D, p, stride=p) per channel, stacked, plus var_embed; an
nn.MultiheadAttention(batch_first=True) whose learned query attends over the C channel tokens of
every patch; plus pos_embed. One thread (torch.set_num_threads(1)), float32, CPU.

Three timings, each the median over --reps after --warmup untimed runs, in wall-clock seconds
(time.perf_counter) and process CPU seconds (time.process_time):
  forward          forward with autograd on, as in training (the graph is built, then dropped)
  forward_no_grad  forward under torch.no_grad()
  forward_backward forward, then backward of out.sum(); gradients are set to None between runs
                   (zero_grad(set_to_none=True)), outside the timed region

Prints one JSON line. Run with /usr/bin/python3 (Debian's python3-torch).
"""
import argparse
import json
import statistics
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", type=int, default=500, help="channels")
    ap.add_argument("--H", type=int, default=64, help="image height")
    ap.add_argument("--W", type=int, default=64, help="image width")
    ap.add_argument("--p", type=int, default=8, help="patch size")
    ap.add_argument("--D", type=int, default=256, help="embedding width")
    ap.add_argument("--heads", type=int, default=8, help="attention heads")
    ap.add_argument("--B", type=int, default=1, help="batch size")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per mode before timing")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name in ("C", "H", "W", "p", "D", "heads", "B", "reps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} is {getattr(a, name)}, expected >= 1")
    if a.warmup < 0:
        ap.error(f"--warmup is {a.warmup}, expected >= 0")
    if a.H % a.p or a.W % a.p:
        ap.error(f"--H {a.H} and --W {a.W} must be multiples of --p {a.p}")
    if a.D % a.heads:
        ap.error(f"--D {a.D} must be a multiple of --heads {a.heads}")
    return a


def import_torch():
    try:
        import torch
        from torch import nn
    except ImportError as e:
        sys.exit(f"pytorch_flat.py: cannot import torch with {sys.executable} ({e}); "
                 "run it with /usr/bin/python3 after installing Debian's python3-torch "
                 "(scripts/install-deps.sh)")
    return torch, nn


def build_model(torch, nn, a):
    L = (a.H // a.p) * (a.W // a.p)

    class FlatFrontEnd(nn.Module):
        """ClimaX: token_embeds, var_embed, var_query + var_agg, pos_embed."""

        def __init__(self):
            super().__init__()
            self.token_embeds = nn.ModuleList(
                [nn.Conv2d(1, a.D, kernel_size=a.p, stride=a.p) for _ in range(a.C)])
            self.var_embed = nn.Parameter(0.02 * torch.randn(1, a.C, a.D))
            self.var_query = nn.Parameter(0.02 * torch.randn(1, 1, a.D))
            self.var_agg = nn.MultiheadAttention(a.D, a.heads, batch_first=True)
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, L, a.D))

        def forward(self, x):  # [B, C, H, W]
            embeds = [self.token_embeds[i](x[:, i:i + 1]).flatten(2).transpose(1, 2)
                      for i in range(a.C)]  # C x [B, L, D]
            x = torch.stack(embeds, dim=1)  # [B, C, L, D]
            x = x + self.var_embed.unsqueeze(2)
            b, _, l, _ = x.shape
            x = torch.einsum("bcld->blcd", x).flatten(0, 1)  # [B*L, C, D]
            q = self.var_query.repeat_interleave(x.shape[0], dim=0)  # [B*L, 1, D]
            x, _ = self.var_agg(q, x, x)  # [B*L, 1, D]
            x = x.squeeze(1).unflatten(0, (b, l))  # [B, L, D]
            return x + self.pos_embed

    return FlatFrontEnd()


def timed(fn, reps, warmup, between=None):
    for _ in range(warmup):
        if between:
            between()
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        if between:
            between()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(wall), "cpu_median_s": statistics.median(cpu),
            "min_s": min(wall), "reps": reps}


def main():
    a = parse_args()
    torch, nn = import_torch()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    model = build_model(torch, nn, a).train()
    images = torch.randn(a.B, a.C, a.H, a.W)

    def forward_grad():
        out = model(images)
        del out  # drops the graph, as a training step would after backward

    def forward_no_grad():
        with torch.no_grad():
            model(images)

    def forward_backward():
        model(images).sum().backward()

    def clear_grads():
        model.zero_grad(set_to_none=True)

    result = {
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(a, k) for k in ("B", "C", "H", "W", "p", "D", "heads")},
        "forward": timed(forward_grad, a.reps, a.warmup),
        "forward_no_grad": timed(forward_no_grad, a.reps, a.warmup),
        "forward_backward": timed(forward_backward, a.reps, a.warmup, clear_grads),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
