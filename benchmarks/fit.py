"""Benchmark: fit every (layer of A, layer of B) Affine map from one streamed StatsGrid pass,
versus the naive way (store all activations, then refit each pair from raw tensors).

Both ways see the same synthetic activations: correlated residual-like layer stacks of two
"models" driven by a shared latent, generated batch by batch from a seed. Each way runs in its
own subprocess so that its peak resident memory (ru_maxrss) is its own; both keep the fitted
maps the same way (one preallocated float64 weight stack), so the difference in memory is the
activations versus the streamed statistics. The parent checks that both produce the same maps.

    python benchmarks/fit.py                      # 12 x 12 layers, d 256 -> 384, 20000 tokens
    python benchmarks/fit.py --quick              # small, a few seconds
    python benchmarks/fit.py --layers-a 6 --layers-b 8 --d-a 128 --d-b 192 --tokens 10000 --batch 500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xlens_align.maps import Affine
from xlens_align.stats import StatsGrid


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Synthetic:
    """Two layer stacks driven by one latent: h_l = h_{l-1} + tanh(h_{l-1} M_l) + noise."""

    def __init__(self, layers_a: int, layers_b: int, d_a: int, d_b: int, seed: int, k: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.k = k = min(k, d_a, d_b)
        self.stacks = []
        for layers, d in ((layers_a, d_a), (layers_b, d_b)):
            embed = torch.randn(k, d, generator=g) / math.sqrt(k)
            mats = [0.5 * torch.randn(d, d, generator=g) / math.sqrt(d) for _ in range(layers)]
            self.stacks.append((embed, mats))

    def batch(self, i: int, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        z = torch.randn(n, self.k, generator=g)
        out = []
        for embed, mats in self.stacks:
            h = z @ embed + 0.1 * torch.randn(n, embed.shape[1], generator=g)
            acts = {}
            for layer, m in enumerate(mats):
                h = h + torch.tanh(h @ m) + 0.1 * torch.randn(h.shape, generator=g)
                acts[f"resid_post.{layer}"] = h
            out.append(acts)
        return out[0], out[1]


def batches(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(i, min(args.batch, args.tokens - s)) for i, s in enumerate(range(0, args.tokens, args.batch))]


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    syn = Synthetic(args.layers_a, args.layers_b, args.d_a, args.d_b, args.seed)
    pa = [f"resid_post.{i}" for i in range(args.layers_a)]
    pb = [f"resid_post.{i}" for i in range(args.layers_b)]
    weights = torch.zeros(args.layers_a, args.layers_b, args.d_a, args.d_b, dtype=torch.float64)
    biases = torch.zeros(args.layers_a, args.layers_b, args.d_b, dtype=torch.float64)
    # warm up both code paths (thread pools, LAPACK) so one-time start-up costs time neither way
    wa, wb = syn.batch(-1, 16)
    StatsGrid(pa[:1], pb[:1]).update(wa, wb)
    Affine(alpha=args.alpha).fit(wa[pa[0]], wb[pb[0]])
    del wa, wb
    base_mb = maxrss_mb()
    t_gen = 0.0
    t0 = time.perf_counter()
    if args.worker == "stream":
        grid = StatsGrid(pa, pb)
        for i, n in batches(args):
            tg = time.perf_counter()
            acts_a, acts_b = syn.batch(i, n)
            t_gen += time.perf_counter() - tg
            grid.update(acts_a, acts_b)
        t1 = time.perf_counter()
        for ia, a in enumerate(pa):
            for ib, b in enumerate(pb):
                m = Affine(alpha=args.alpha).fit_stats(grid[a, b])
                weights[ia, ib], biases[ia, ib] = m.weight_, m.bias_
    else:
        store_a = {p: torch.empty(args.tokens, args.d_a) for p in pa}
        store_b = {p: torch.empty(args.tokens, args.d_b) for p in pb}
        row = 0
        for i, n in batches(args):
            tg = time.perf_counter()
            acts_a, acts_b = syn.batch(i, n)
            t_gen += time.perf_counter() - tg
            for p in pa:
                store_a[p][row : row + n] = acts_a[p]
            for p in pb:
                store_b[p][row : row + n] = acts_b[p]
            row += n
        del acts_a, acts_b
        t1 = time.perf_counter()
        for ia, a in enumerate(pa):
            for ib, b in enumerate(pb):
                m = Affine(alpha=args.alpha).fit(store_a[a], store_b[b])
                weights[ia, ib], biases[ia, ib] = m.weight_, m.bias_
    t2 = time.perf_counter()
    peak_mb = maxrss_mb()
    save_file({"weights": weights, "biases": biases}, args.out)
    result = {
        "mode": args.worker,
        "total_s": t2 - t0,
        "gen_s": t_gen,
        "pass_s": t1 - t0 - t_gen,
        "fit_s": t2 - t1,
        "base_mb": base_mb,
        "peak_mb": peak_mb,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(mode: str, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--out", out]
    for key in ("layers_a", "layers_b", "d_a", "d_b", "tokens", "batch", "alpha", "seed", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} worker failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers-a", type=int, default=12)
    ap.add_argument("--layers-b", type=int, default=12)
    ap.add_argument("--d-a", type=int, default=256)
    ap.add_argument("--d-b", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.0, help="ridge strength of every Affine map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    ap.add_argument(
        "--quick", action="store_true", help="small sizes (3 x 4 layers, d 32 -> 48, 3000 tokens)"
    )
    ap.add_argument("--worker", choices=("stream", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.layers_a, args.layers_b, args.d_a, args.d_b, args.tokens, args.batch = 3, 4, 32, 48, 3000, 500
    la, lb = args.layers_a, args.layers_b
    act_mb = args.tokens * (la * args.d_a + lb * args.d_b) * 4 / 2**20
    maps_mb = la * lb * (args.d_a + 1) * args.d_b * 8 / 2**20
    print(
        f"{la} x {lb} = {la * lb} Affine maps (alpha={args.alpha}), d {args.d_a} -> {args.d_b}, "
        f"{args.tokens} tokens in batches of {args.batch}, {args.threads} torch threads per worker"
    )
    print(f"stored activations (float32): {act_mb:.0f} MiB; fitted map stack (float64): {maps_mb:.0f} MiB\n")
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for mode in ("stream", "naive"):
            out = os.path.join(tmp, f"{mode}.safetensors")
            res[mode] = run_worker(mode, args, out)
            r = res[mode]
            label = "streamed StatsGrid + fit_stats" if mode == "stream" else "store all + refit each pair"
            print(
                f"{label:32s} total {r['total_s']:7.2f} s  (generate {r['gen_s']:.2f}, "
                f"{'accumulate' if mode == 'stream' else 'store'} {r['pass_s']:.2f}, fit {r['fit_s']:.2f})  "
                f"peak RSS {r['peak_mb']:7.0f} MiB (+{r['peak_mb'] - r['base_mb']:.0f} over start)"
            )
        s_maps = load_file(os.path.join(tmp, "stream.safetensors"))
        n_maps = load_file(os.path.join(tmp, "naive.safetensors"))
    dw = float((s_maps["weights"] - n_maps["weights"]).abs().max())
    db = float((s_maps["biases"] - n_maps["biases"]).abs().max())
    rel = dw / float(n_maps["weights"].abs().max())
    s, n = res["stream"], res["naive"]
    speed = n["total_s"] / s["total_s"]
    speed_work = (n["pass_s"] + n["fit_s"]) / (s["pass_s"] + s["fit_s"])
    mem = (n["peak_mb"] - n["base_mb"]) / max(s["peak_mb"] - s["base_mb"], 1e-9)
    print(
        f"\nspeed-up {speed:.2f}x end to end, {speed_work:.2f}x excluding data generation; "
        f"memory over start {mem:.2f}x less when streamed"
    )
    print(f"same maps: max |dW| = {dw:.3g} (relative {rel:.3g}), max |db| = {db:.3g}")
    ok = rel < 1e-8
    print(
        f"SUMMARY {la}x{lb} Affine maps d{args.d_a}->{args.d_b} {args.tokens} tok: streamed {s['total_s']:.2f} s "
        f"/ +{s['peak_mb'] - s['base_mb']:.0f} MiB vs naive {n['total_s']:.2f} s / +{n['peak_mb'] - n['base_mb']:.0f} MiB "
        f"-> {speed:.2f}x faster, {mem:.2f}x less memory; max rel diff {rel:.2g} ({'OK' if ok else 'MISMATCH'})"
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
