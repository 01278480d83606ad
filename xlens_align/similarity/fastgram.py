"""Per-minibatch HSIC terms of `MinibatchCKA` with Grams in float32, TF32 or bfloat16.

For one side of the grid, every point's minibatch is centred in float32 (float64 for float64
input), multiplied by the point's fixed power of two, and rounded once to the product's input
type; then one batched product per width gives all of the side's Grams ``K = X_c X_c^T`` in
float32 (bfloat16 and TF32 multiply exactly and accumulate in float32). Centring before the
rounding keeps the rounding error relative to the centred features, not to a large common mean
(the residual stream's). The mean subtracted is that of the minibatch's first `MEAN_ROWS` rows:
HSIC_1 is exactly invariant to shifting a point's features, so the centring only has to remove
the bulk of the mean (what is left, ~ std / sqrt(MEAN_ROWS) per feature, is far below the spread
that sets the rounding). A non-finite input value makes its row's Gram diagonal non-finite, which
`SideGrams.finite` reports without another pass.

With the diagonal of K zeroed (K~), Song et al.'s unbiased HSIC is

    HSIC_1(K, L) = (<K~, L~> + s_K s_L / ((n-1)(n-2)) - 2 r_K . r_L / (n-2)) / (n(n-3))

with r the row sums of K~ and s their total. ``<K~_a, L~_b>`` for every (A, B) pair comes
from one batched product over blocks of Gram rows (about 4096 terms per float32 dot product,
IEEE float32 even where TF32 is on), summed over blocks in float64; the row sums, the self
terms and the combination are float64. The per-minibatch HSICs are then averaged in float64 as in the float64
path. The error comes from rounding the centred features (relative 2**-9 in bfloat16, 2**-11 in
TF32, 2**-24 in float32): it is like adding independent noise of that relative size to every
entry, which moves CKA by far less than 1e-4 at the sizes of `benchmarks/similarity.py`
(which prints the difference to the float64 path).
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
# precision="auto": float64 off CUDA; on CUDA this one (benchmarks/similarity.py prints its error
# against float64 over the whole grid, H200: 6.4e-8 at d=4096, 33x33, 100k tokens; 3.0e-7 at d
# 512/1024; bf16 gave 8.9e-7 and 2.7e-6 at the same speed, within 3%)
CUDA_DEFAULT = "tf32"
MEAN_ROWS = 256


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

    k: Float[Tensor, "p n n"]
    finite: Tensor  # bool scalar: every Gram diagonal is finite (so is every input value)
    rows: Float[Tensor, "p n"]  # row sums of K~
    total: Float[Tensor, " p"]  # sum of K~
    frob: Float[Tensor, " p"]  # <K~, K~>


def _centred(ts: list[Tensor], scales: list[float], scale_t: Tensor, dtype: torch.dtype) -> Tensor:
    """[P, n, d] of ``(x - mean) * scale`` rounded once to `dtype` (all ts of one width; `scale_t`:
    `scales` as a float64 [P] tensor on the device)."""
    device = scale_t.device
    xs = [t.to(device) for t in ts]
    xs = [x if x.dtype in (torch.float32, torch.float64) else x.float() for x in xs]
    (n, d), m = xs[0].shape, min(xs[0].shape[0], MEAN_ROWS)
    head = torch.stack([x[:m] for x in xs])  # [P, m, d]: one copy of the first rows
    neg_means = torch.matmul(head.new_full((m,), -1.0 / m), head) * scale_t[:, None].to(head.dtype)
    out = torch.empty(len(xs), n, d, dtype=dtype, device=device)
    for j, (x, s) in enumerate(zip(xs, scales, strict=True)):
        torch.add(neg_means[j], x, alpha=s, out=out[j])  # one pass: s*x - s*mean, rounded on write
    return out


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
    """The Grams of one side's minibatch (one product per distinct width) and their sums.

    scales: each point's power of two; scale_t: the same as a float64 tensor on the device where
    the Grams are formed (pass it to avoid a host-to-device copy per call; default: on ts' device).
    """
    if scale_t is None:
        scale_t = torch.tensor(scales, dtype=torch.float64, device=ts[0].device)
    device = scale_t.device
    n = ts[0].shape[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    widths: dict[int, list[int]] = {}
    for i, t in enumerate(ts):
        widths.setdefault(t.shape[1], []).append(i)
    k = None
    for idx in widths.values():
        sel = torch.tensor(idx, device=device) if len(idx) < len(ts) else None
        x = _centred(
            [ts[i] for i in idx], [scales[i] for i in idx], scale_t if sel is None else scale_t[sel], dtype
        )
        g = _gram(x, precision)
        if len(idx) == len(ts):
            k = g
        else:
            if k is None:
                k = torch.empty(len(ts), n, n, dtype=torch.float32, device=device)
            k[sel] = g
    assert k is not None
    diag = k.diagonal(dim1=1, dim2=2)
    finite = torch.isfinite(diag).all()  # sums of squares: inf or nan where a row is
    diag.zero_()
    rows = k.sum(-1).double()  # n float32 terms per row, rows summed in float64
    frob = torch.linalg.vector_norm(k, dim=-1).double().square().sum(-1)
    return SideGrams(k, finite, rows, rows.sum(-1), frob)


def _cross(a: Tensor, b: Tensor) -> Float[Tensor, "pa pb"]:
    """``<a_i, b_j>`` (Frobenius) of [P, n, n] float32 stacks: float32 products over blocks of
    rows (about 4096 terms each), summed in float64."""
    (pa, n, _), pb = a.shape, b.shape[0]
    r = max(1, min(n, 4096 // n))
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
        cross = _cross(a.k, b.k)
    c1, c2, scale = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2), 1.0 / (n * (n - 3))
    hab = (cross + c1 * a.total[:, None] * b.total[None, :] - c2 * (a.rows @ b.rows.T)) * scale

    def own(g: SideGrams) -> Tensor:
        return (g.frob + c1 * g.total.square() - c2 * g.rows.square().sum(-1)) * scale

    return hab, own(a), own(b)
