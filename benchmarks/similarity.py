"""Benchmark: streamed all-pairs minibatch CKA vs a per-pair loop over stored activations.

Two synthetic layer stacks (model A: L layers of width d_a, model B: L layers of width d_b)
are generated minibatch by minibatch from seeded generators, so the same data can be produced
twice without being held:

- streamed: `xlens_align.similarity.MinibatchCKA` sees each minibatch once and gets the
  debiased CKA of all L_A x L_B pairs from one U-centred-Gram matrix product per minibatch;
  nothing but the current minibatch is in memory.
- baseline: the activations are stored first (as per-pair tools need them), then for each
  pair of layers a loop over the same minibatches computes both Gram matrices and the three
  unbiased HSICs (Song et al. 2012) of that pair, and averages them (Nguyen et al. 2021).

Both use float64 Grams, the same minibatch size and the same estimator; the script checks
that they give the same values. The streamed pass is then repeated with each reduced-precision
Gram path of `MinibatchCKA` (`--fast`, default bf16 and tf32: Grams from bfloat16 / TF32 inputs,
float64 HSIC sums), which prints its time and its max |CKA - float64 CKA| over the whole grid
(target <= 1e-4); `--no-baseline` skips the per-pair loop. Only the CKA work is timed (data generation and storing
are not). When storing every layer would not fit in memory, the baseline stores and runs
an evenly spaced subset of layers and its time is extrapolated linearly in the number of
pairs (each pair costs the same); this is printed.

    python benchmarks/similarity.py [--device cuda] [--d-a 512 --d-b 1024 --layers 24
                                     --tokens 50000 --batch 1000] [--quick]
                                    [--fast bf16,tf32] [--no-baseline]
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import time
from pathlib import Path

import torch

from xlens_align.similarity import MinibatchCKA

# -- synthetic data ---------------------------------------------------------------------------


class Stack:
    """A synthetic L-layer model: layer l = z @ W_l + noise_l, W_l rotating with depth."""

    def __init__(
        self, layers: int, d: int, rank: int, seed: int, device: torch.device, mean: float = 0.0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        p, q = torch.randn(2, rank, d, generator=g) / math.sqrt(rank)
        self.mean = (mean * torch.randn(layers, d, generator=g)).to(device)  # a fixed offset per layer
        t = torch.linspace(0.0, math.pi / 2, layers)
        self.w = (torch.cos(t)[:, None, None] * p + torch.sin(t)[:, None, None] * q).to(device)
        self.noise = torch.linspace(0.5, 1.5, layers).tolist()
        self.seed, self.device, self.d, self.layers = seed, device, d, layers

    def batch(self, z: torch.Tensor, b: int) -> list[torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + b)
        n = z.shape[0]
        return [
            torch.addmm(self.mean[i], z, self.w[i])
            + self.noise[i] * torch.randn(n, self.d, generator=g, device=self.device)
            for i in range(self.layers)
        ]


def latent(b: int, n: int, rank: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(7_000_001 + b)
    return torch.randn(n, rank, generator=g, device=device)


def batch_sizes(tokens: int, batch: int) -> list[int]:
    sizes = [batch] * (tokens // batch)
    if tokens % batch >= 4:
        sizes.append(tokens % batch)
    return sizes


# -- memory measurement -----------------------------------------------------------------------


class PeakMemory:
    """Peak extra memory of a phase: CUDA allocator peak, or peak RSS on CPU (Linux VmHWM)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS)"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
                self.start = self._status("VmRSS")
            except OSError:
                self.how = "ru_maxrss (not resettable: includes earlier phases)"
                self.start = 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.how.startswith("VmHWM"):
            self.peak = self._status("VmHWM") - self.start
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.7 * free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(0.6 * int(line.split()[1]) * 1024)
    return 8 * 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


# -- the two methods --------------------------------------------------------------------------


def run_streamed(
    sa: Stack, sb: Stack, sizes: list[int], rank: int, device: torch.device, precision: str = "float64"
):
    names_a = [f"L{i}" for i in range(sa.layers)]
    names_b = [f"L{i}" for i in range(sb.layers)]
    acc = MinibatchCKA(names_a, names_b, device=device, precision=precision)
    t_cka = t_gen = 0.0
    for b, n in enumerate(sizes):
        t0 = time.perf_counter()
        z = latent(b, n, rank, device)
        xa, xb = (
            dict(zip(names_a, sa.batch(z, b), strict=True)),
            dict(zip(names_b, sb.batch(z, b), strict=True)),
        )
        sync(device)
        t1 = time.perf_counter()
        acc.update(xa, xb)
        sync(device)
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_cka += t2 - t1
        del xa, xb, z
    t0 = time.perf_counter()
    values = acc.compute()
    sync(device)
    t_cka += time.perf_counter() - t0
    return values.cpu(), t_cka, t_gen


def _gram_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 Gram of the centred minibatch with zero diagonal, its column sums and total."""
    x = x.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    k = x @ x.T
    k.fill_diagonal_(0.0)
    r = k.sum(0)
    return k, r, r.sum()


def _hsic1(k, rk, sk, l_, rl, sl, n: int) -> torch.Tensor:
    """Song et al.'s unbiased HSIC from zero-diagonal Grams and their row sums."""
    tr = torch.dot(k.view(-1), l_.view(-1))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 * torch.dot(rk, rl) / (n - 2)) / (n * (n - 3))


def run_baseline(
    sa: Stack, sb: Stack, sizes: list[int], rank: int, device: torch.device, la: list[int], lb: list[int]
):
    tokens = sum(sizes)
    store_a = torch.empty(len(la), tokens, sa.d, dtype=torch.float32, device=device)
    store_b = torch.empty(len(lb), tokens, sb.d, dtype=torch.float32, device=device)
    s = 0
    for b, n in enumerate(sizes):  # store the activations (not timed)
        z = latent(b, n, rank, device)
        xa, xb = sa.batch(z, b), sb.batch(z, b)
        for i, li in enumerate(la):
            store_a[i, s : s + n] = xa[li]
        for j, lj in enumerate(lb):
            store_b[j, s : s + n] = xb[lj]
        s += n
        del xa, xb
    sync(device)
    t0 = time.perf_counter()
    out = torch.empty(len(la), len(lb), dtype=torch.float64, device=device)
    for i in range(len(la)):
        for j in range(len(lb)):
            hxy = hxx = hyy = torch.zeros((), dtype=torch.float64, device=device)
            s = 0
            for n in sizes:
                k, rk, sk = _gram_stats(store_a[i, s : s + n])
                l_, rl, sl = _gram_stats(store_b[j, s : s + n])
                hxy = hxy + n * _hsic1(k, rk, sk, l_, rl, sl, n)
                hxx = hxx + n * _hsic1(k, rk, sk, k, rk, sk, n)
                hyy = hyy + n * _hsic1(l_, rl, sl, l_, rl, sl, n)
                s += n
            out[i, j] = hxy / torch.sqrt(hxx * hyy)
    sync(device)
    return out.cpu(), time.perf_counter() - t0


def warm_up(device: torch.device, precisions: list[str]) -> None:
    """Initialise the device's libraries (BLAS handles, allocator) before anything is timed."""
    x = torch.randn(64, 32, device=device)
    for p in ["float64", *precisions]:
        MinibatchCKA(precision=p).update({"a": x, "c": x}, {"b": x}).compute()
    k, rk, sk = _gram_stats(x)
    _hsic1(k, rk, sk, k, rk, sk, 64)
    sync(device)


def run_fast(sa, sb, sizes, rank, device, precisions: list[str], ref: torch.Tensor, t_ref: float) -> str:
    """Time the streamed pass in each reduced precision; print it against the float64 pass."""
    tokens, out = sum(sizes), ""
    for p in precisions:
        with PeakMemory(device) as mem:
            values, t, _ = run_streamed(sa, sb, sizes, rank, device, p)
        err = float((values - ref).abs().max())
        flag = "ok" if err <= 1e-4 else "ABOVE 1e-4"
        print(
            f"{p:9s}: {t:9.3f} s CKA time ({tokens / t:,.0f} tokens/s, {t_ref / t:.1f}x float64)  "
            f"peak mem {gib(mem.peak)}  max |CKA - float64 CKA| over {values.numel()} pairs = {err:.2e} ({flag})"
        )
        out += f" {p}={t:.3f}s({tokens / t:,.0f}tok/s,maxdiff={err:.1e}{'' if err <= 1e-4 else ',ABOVE'})"
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-a", type=int, default=512)
    ap.add_argument("--d-b", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24, help="layers of each model (grid is layers x layers)")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1000, help="minibatch size (rows), same for both methods")
    ap.add_argument("--rank", type=int, default=64, help="rank of the shared latent")
    ap.add_argument(
        "--baseline-layers",
        type=int,
        default=None,
        help="store/run only this many layers per model in the baseline and extrapolate (default: all, or fewer if storing all would not fit)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="small size: 6 layers, d 64/128, 2000 tokens, batch 200"
    )
    ap.add_argument(
        "--fast",
        default="bf16,tf32",
        help="comma-separated reduced precisions of MinibatchCKA to time against float64 ('' for none)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the per-pair baseline loop")
    ap.add_argument(
        "--mean",
        type=float,
        default=0.0,
        help="give every layer a fixed mean, entries ~ N(0, mean^2) (the spread is ~1): the reduced-precision paths then centre",
    )
    args = ap.parse_args(argv)
    fast = [p for p in args.fast.split(",") if p]
    if args.quick:
        args.layers, args.d_a, args.d_b, args.tokens, args.batch = 6, 64, 128, 2000, 200
    device = torch.device(args.device)
    if args.batch < 4 or args.tokens < args.batch:
        raise SystemExit("--batch must be >= 4 and <= --tokens")
    sizes = batch_sizes(args.tokens, args.batch)
    tokens = sum(sizes)
    L = args.layers
    sa = Stack(L, args.d_a, args.rank, 1, device, args.mean)
    sb = Stack(L, args.d_b, args.rank, 2, device, args.mean)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}) "
        f"d_a={args.d_a} d_b={args.d_b} layers={L}x{L} tokens={tokens} minibatch={args.batch} ({len(sizes)} minibatches), "
        f"layer means ~ N(0, {args.mean:g}^2), float64 Grams"
    )

    warm_up(device, fast)
    with PeakMemory(device) as mem_s:
        streamed, t_s, t_gen = run_streamed(sa, sb, sizes, args.rank, device)
    print(
        f"streamed : {t_s:9.2f} s CKA time ({tokens / t_s:,.0f} tokens/s)  peak mem {gib(mem_s.peak)}  [data generation {t_gen:.2f} s, not counted]"
    )
    fast_summary = run_fast(sa, sb, sizes, args.rank, device, fast, streamed, t_s)
    if args.no_baseline:
        print(f"SUMMARY device={device.type} grid={L}x{L} d_a={args.d_a} d_b={args.d_b} tokens={tokens} "
              f"batch={args.batch} mean={args.mean:g} float64={t_s:.3f}s{fast_summary}")  # fmt: skip
        if "ABOVE" in fast_summary:
            raise SystemExit("a reduced-precision path is more than 1e-4 from float64")
        return

    full_store = tokens * L * (args.d_a + args.d_b) * 4
    k = L if args.baseline_layers is None else max(1, min(L, args.baseline_layers))
    budget = memory_budget(device)
    if args.baseline_layers is None and full_store > budget:
        k = max(1, min(L, int(budget // (tokens * (args.d_a + args.d_b) * 4))))
        print(
            f"baseline : storing all layers needs {gib(full_store)} > budget {gib(budget)}: running {k}x{k} of {L}x{L} pairs"
        )
    idx = sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)})
    with PeakMemory(device) as mem_b:
        base, t_b_run = run_baseline(sa, sb, sizes, args.rank, device, idx, idx)
    scale = (L * L) / (len(idx) ** 2)
    t_b = t_b_run * scale
    note = (
        ""
        if scale == 1
        else f" (ran {len(idx)}x{len(idx)} pairs in {t_b_run:.2f} s, extrapolated x{scale:.2f})"
    )
    print(
        f"baseline : {t_b:9.2f} s CKA time{note}  peak mem {gib(mem_b.peak)}  [stored activations {gib(tokens * len(idx) * (args.d_a + args.d_b) * 4)}; all layers would be {gib(full_store)}]"
    )
    diff = float((streamed[idx][:, idx] - base).abs().max())
    print(f"max |streamed - baseline| over {len(idx) ** 2} pairs = {diff:.2e}   (memory: {mem_s.how})")
    print(f"CKA grid sample: diag {[round(float(streamed[i, i]), 3) for i in range(0, L, max(1, L // 6))]}")
    ratio = t_b / t_s
    print(f"speedup  : {ratio:.1f}x  (target >= 20x){'' if ratio >= 20 else '  BELOW TARGET'}")
    extrap = "extrapolated" if scale != 1 else "measured"
    print(
        f"SUMMARY device={device.type} grid={L}x{L} d_a={args.d_a} d_b={args.d_b} tokens={tokens} batch={args.batch} "
        f"streamed={t_s:.2f}s baseline={t_b:.2f}s({extrap}) speedup={ratio:.1f}x "
        f"peak_mem streamed={gib(mem_s.peak)} baseline={gib(mem_b.peak)} max_abs_diff={diff:.1e}{fast_summary}"
    )
    if diff > 1e-8:
        raise SystemExit(f"streamed and baseline CKA disagree by {diff:.2e}")
    if "ABOVE" in fast_summary:
        raise SystemExit("a reduced-precision path is more than 1e-4 from float64")


if __name__ == "__main__":
    main()
