"""Per-minibatch HSIC terms of `MinibatchCKA` with Grams in float32, TF32 or bfloat16.

For one side of the grid, each point's minibatch is rounded once to the product's input type
(bfloat16 for bf16, float32 for TF32 and float32, where cuBLAS rounds to TF32 itself) and its Gram
``K = X X^T`` formed in float32 (bfloat16 and TF32 multiply exactly and accumulate in float32) by
one batched product per width (one product per point of n = 1000 rows fills too few of an H200's
multiprocessors: TF32 went from 0.40 to 0.45 s on the grid below).
The rounding error is relative to |x|; what CKA needs is the centred features, so a point whose
common mean is large is centred first (in float32, float64 for float64 input): its features
minus the mean of the minibatch's first `MEAN_ROWS` rows. `_needs_centring` decides per point
and minibatch from those rows: centre when the squared norm of their mean exceeds `CENTRE_RATIO`
(1/4) times their mean squared distance to it; otherwise the rounding error, relative to the
centred features, is at most sqrt(1.25) times what centring would leave, and the centring pass
(the costliest step after the product) is skipped. HSIC_1 is exactly invariant to shifting a
point's features, so neither the choice nor the head mean (std / sqrt(MEAN_ROWS) off) changes the
estimate beyond rounding. Features go in unscaled when the point's power of two is within
2**+-`SAFE_EXP` (no float32 overflow or underflow is possible in the Grams or their products there;
the float64 sums are rescaled exactly by `SideGrams.gain`), scaled by it otherwise (1e200, 1e-200).
A non-finite input value makes its row's Gram diagonal non-finite, which `SideGrams.finite`
reports without another pass.

With the diagonal of K zeroed (K~), Song et al.'s unbiased HSIC is

    HSIC_1(K, L) = (<K~, L~> + s_K s_L / ((n-1)(n-2)) - 2 r_K . r_L / (n-2)) / (n(n-3))

with r the row sums of K~ and s their total. ``<K~_a, L~_b>`` for every (A, B) pair comes
from one batched product over blocks of Gram rows (about `CROSS_TERMS` terms per float32 dot
product, IEEE float32 even where TF32 is on), summed over blocks in float64; the row sums, the
self terms and the combination are float64. The per-minibatch HSICs are then averaged in float64
as in the float64 path. The error comes from rounding the features (relative 2**-9 in bfloat16,
2**-11 in TF32, 2**-24 in float32): it is like adding independent noise of that relative size to
every entry, which moves CKA by far less than 1e-4 at the sizes of `benchmarks/similarity.py`
(which prints the difference to the float64 path, with `--mean` for layers with large means).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["PRECISIONS", "SideGrams", "check_precision", "hsic_terms", "resolve_precision", "side_grams"]

PRECISIONS = ("float64", "float32", "tf32", "bf16")
# precision="auto": float64 off CUDA; on CUDA this one (benchmarks/similarity.py prints its time and
# its error against float64 over the whole grid; H200, 33x33 points, d=4096, 100k tokens: bf16 0.350 s,
# max |diff| 7.6e-7 (8.8e-7 with --mean 10: 0.450 s); tf32 0.40-0.45 s, 7.6e-8; 24x24 at d 512/1024,
# 50k tokens: bf16 0.103 s, 2.8e-6)
CUDA_DEFAULT = "bf16"
MEAN_ROWS = 256
# float32 terms per block of the cross products (H200, 33x33: 2000 as fast as 1000, 4096 7% slower)
CROSS_TERMS = 2000
CENTRE_RATIO = 0.25
SAFE_EXP = 20


def check_precision(precision: object) -> str:
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> float64 on CPU (and any non-CUDA device), `CUDA_DEFAULT` on CUDA."""
    if precision != "auto":
        return precision
    return CUDA_DEFAULT if device.type == "cuda" else "float64"


@contextmanager
def fp32_matmul(device: torch.device, tf32: bool) -> Iterator[None]:
    """float32 products on `device` in TF32 or in IEEE float32, whatever the global setting."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if tf32 else "ieee"
    else:  # older torch
        old = m.allow_tf32
        m.allow_tf32 = tf32
    try:
        yield
    finally:
        if hasattr(m, "fp32_precision"):
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


class SideGrams(NamedTuple):
    """One side's zero-diagonal Grams (float32 [P, n, n]) and their float64 sums."""

    k: Float[Tensor, "p n n"]  # gain[p] times the Gram of point p's features (scaled by its power of two)
    finite: Tensor  # bool scalar: every Gram diagonal is finite (so is every input value)
    rows: Float[Tensor, "p n"]  # row sums of K~ (divided by the gain, like the next two)
    total: Float[Tensor, " p"]  # sum of K~
    frob: Float[Tensor, " p"]  # <K~, K~>
    gain: Float[Tensor, " p"]  # float64 powers of two


def _needs_centring(head: Tensor) -> list[bool]:
    """Per point of `head` [P, m, d] (a minibatch's first rows): is the squared norm of their mean
    over `CENTRE_RATIO` times their mean squared distance to it? (One host sync.)"""
    m = head.shape[1]
    mean_sq = torch.linalg.vector_norm(head, dim=(1, 2)).double().square() / m
    mu_sq = torch.linalg.vector_norm(head.mean(1), dim=-1).double().square()
    return (mu_sq > CENTRE_RATIO * (mean_sq - mu_sq)).tolist()


def _prepared(x: Tensor, mu: Tensor | None, s: float, out: Tensor | None, into: Tensor) -> None:
    """``(x - mu) * s`` (mu None: ``x * s``) computed in x's dtype and rounded once into `into`:
    written there directly when `out` is `into` (float32), else through a float32 temporary."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if mu is None:
        torch.mul(x, s, out=out)
    elif s == 1.0:
        torch.sub(x, mu.to(x.dtype), out=out)
    else:
        torch.add(mu.to(x.dtype) * -s, x, alpha=s, out=out)
    if out is not into:
        into.copy_(out)


def _gram(x: Tensor, precision: str) -> Float[Tensor, "p n n"]:
    if precision == "bf16" and x.is_cuda:
        try:
            return torch.bmm(x, x.mT, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # no bf16 -> float32 product here: TF32 of the bf16 values is exact alike
    x = x.float()
    with fp32_matmul(x.device, tf32=precision != "float32"):
        return torch.bmm(x, x.mT)


def side_grams(
    ts: list[Tensor], scales: list[float], precision: str, scale_t: Tensor | None = None
) -> SideGrams:
    """The Grams of one side's minibatch and their float64 sums.

    scales: each point's power of two. Where it lies in [2**-SAFE_EXP, 2**SAFE_EXP] the features
    go in unscaled (no float32 overflow or underflow can happen there) and the sums are divided by
    its square (`gain`, exact); outside, the features are multiplied by it first. Features are
    centred on the mean of their first `MEAN_ROWS` rows only where `_needs_centring` says so.
    Features are rounded into one buffer per width (a multi-tensor copy for those that need
    neither), then one batched product. scale_t: where the Grams are formed (its device; default:
    ts' device).
    """
    device = scale_t.device if scale_t is not None else ts[0].device
    n = ts[0].shape[0]
    safe = [2.0**-SAFE_EXP <= s <= 2.0**SAFE_EXP for s in scales]
    gain = [1.0 / (s * s) if ok else 1.0 for s, ok in zip(scales, safe, strict=True)]
    in_scale = [1.0 if ok else s for s, ok in zip(scales, safe, strict=True)]
    k = torch.empty(len(ts), n, n, dtype=torch.float32, device=device)
    widths: dict[int, list[int]] = {}
    for i, t in enumerate(ts):
        widths.setdefault(t.shape[1], []).append(i)
    for idx in widths.values():
        xs = [ts[i].to(device) for i in idx]
        xs = [x if x.dtype in (torch.float32, torch.float64) else x.float() for x in xs]
        head = torch.stack([x[: min(n, MEAN_ROWS)] for x in xs])  # [P, m, d]: one copy of the first rows
        mus = head.mean(1)
        if any(in_scale[i] != 1.0 for i in idx):  # 1e200 or 1e-200: decide on the scaled rows
            head = (
                head
                * torch.tensor([in_scale[i] for i in idx], dtype=head.dtype, device=device)[:, None, None]
            )
        centre = _needs_centring(head)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        buf = torch.empty(len(xs), n, xs[0].shape[1], dtype=dtype, device=device)
        dst, src = [], []  # rounded as they are: one multi-tensor copy
        for j, i in enumerate(idx):
            if centre[j] or in_scale[i] != 1.0:
                mu = mus[j] if centre[j] else None
                _prepared(xs[j], mu, in_scale[i], buf[j] if dtype == torch.float32 else None, into=buf[j])
            else:
                dst.append(buf[j])
                src.append(xs[j])
        if dst:
            torch._foreach_copy_(dst, src)
        g = _gram(buf, precision)  # one batched product: per-point products fill a fraction of the GPU
        if len(idx) == len(ts):
            k = g
        else:
            k[torch.tensor(idx, device=device)] = g
    diag = k.diagonal(dim1=1, dim2=2)
    finite = torch.isfinite(diag).all()  # sums of squares: inf or nan where a row is
    diag.zero_()
    gain_t = torch.tensor(gain, dtype=torch.float64, device=device)
    rows = k.sum(-1).double() / gain_t[:, None]  # n float32 terms per row, rows summed in float64
    frob = torch.linalg.vector_norm(k, dim=-1).double().square().sum(-1) / gain_t.square()
    return SideGrams(k, finite, rows, rows.sum(-1), frob, gain_t)


def _cross(a: Tensor, b: Tensor) -> Float[Tensor, "pa pb"]:
    """``<a_i, b_j>`` (Frobenius) of [P, n, n] float32 stacks: float32 products over blocks of
    rows (about 4096 terms each), summed in float64."""
    (pa, n, _), pb = a.shape, b.shape[0]
    r = max(1, min(n, CROSS_TERMS // n))
    g = n // r
    head = torch.bmm(
        a[:, : g * r].reshape(pa, g, r * n).transpose(0, 1),
        b[:, : g * r].reshape(pb, g, r * n).permute(1, 2, 0),
    ).sum(0, dtype=torch.float64)
    if g * r == n:
        return head
    return head + (a[:, g * r :].reshape(pa, -1) @ b[:, g * r :].reshape(pb, -1).T).double()


def hsic_terms(a: SideGrams, b: SideGrams) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased HSIC_1 (float64) of every (A, B) pair, of A with itself, of B with itself."""
    n = a.k.shape[-1]
    with fp32_matmul(a.k.device, tf32=False):
        cross = _cross(a.k, b.k) / (a.gain[:, None] * b.gain[None, :])
    c1, c2, scale = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2), 1.0 / (n * (n - 3))
    hab = (cross + c1 * a.total[:, None] * b.total[None, :] - c2 * (a.rows @ b.rows.T)) * scale

    def own(g: SideGrams) -> Tensor:
        return (g.frob + c1 * g.total.square() - c2 * g.rows.square().sum(-1)) * scale

    return hab, own(a), own(b)
