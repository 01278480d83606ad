"""Geometry-based measures: orthogonal Procrustes distance, mutual k-NN overlap and RSA.

Zero-variance input (all rows identical) has no geometry: similarities (`mutual_knn`, `rsa`)
return 0.0 and `procrustes_distance` returns its maximum sqrt(2), each with a
`DegenerateInputWarning`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from xlens_align.validate import positive_int

from . import _util as ut

__all__ = ["knn_indices", "mutual_knn", "procrustes_distance", "rankdata", "rdm", "rsa", "spearman"]

_SQRT2 = math.sqrt(2.0)


# -- Procrustes -------------------------------------------------------------------------------
def _prep_procrustes(x: Tensor, eps: float) -> Tensor | None:
    """X_c / ||X_c||_F expressed in its own right-singular basis (same singular values)."""
    xc = ut.centred(x)
    if xc is None:
        return None
    xn = xc / torch.linalg.matrix_norm(xc)
    if xn.shape[0] >= xn.shape[1]:
        return xn
    u, s, _ = ut.orth_basis(xn, eps)
    return u * s


def _pair_procrustes(px: Tensor | None, py: Tensor | None) -> float:
    if px is None or py is None:
        return ut.warn_degenerate("X" if px is None else "Y", "procrustes_distance", _SQRT2)
    nuc = torch.linalg.svdvals(px.T @ py).sum()
    return ut.finite_or_raise(torch.sqrt((2.0 - 2.0 * nuc).clamp(min=0.0)), "procrustes_distance")


def procrustes_distance(X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"]) -> float:
    """Orthogonal Procrustes distance ``min_R ||X_n - Y_n R||_F = sqrt(2 - 2 ||X_n^T Y_n||_*)``.

    X_n, Y_n are the centred inputs scaled to unit Frobenius norm, R ranges over orthogonal maps
    (the narrower input is zero-padded when d_x != d_y). In [0, sqrt(2)]; 0 for rotated,
    reflected, scaled or shifted copies. A distance: lower is more similar.
    """
    x, y = ut.as_pair(X, Y, 2, "procrustes_distance")
    return _pair_procrustes(_prep_procrustes(x, ut.rank_eps(X)), _prep_procrustes(y, ut.rank_eps(Y)))


# -- mutual k nearest neighbours -------------------------------------------------------------
def _knn(x: Tensor, k: int, metric: str, chunk: int = 1024) -> Tensor:
    n = x.shape[0]
    if metric == "cosine":
        z = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp(min=1e-300)
    else:
        z = ut.center(x)
        sq = (z * z).sum(1)
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for i in range(0, n, chunk):
        sim = z[i : i + chunk] @ z.T
        if metric == "euclidean":
            sim = 2.0 * sim - sq[None, :] - sq[i : i + chunk, None]  # -||x_i - x_j||^2
        rows = torch.arange(i, min(i + chunk, n), device=x.device)
        sim[rows - i, rows] = -math.inf
        out[i : i + chunk] = sim.topk(k, dim=1).indices
    return out


def _check_knn(n: int, k: int, metric: str) -> None:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    positive_int(k, "k")
    if k >= n - 1:
        raise ValueError(f"k must be < n - 1 (n={n} rows) for the overlap to carry information, got k={k}")


def knn_indices(
    X: Float[Tensor, "n d"], k: int = 10, metric: Literal["cosine", "euclidean"] = "cosine"
) -> Int[Tensor, "n k"]:
    """Indices of the k nearest other rows of each row (self excluded), nearest first."""
    x = ut.scaled64(ut.as_matrix(X, "X"))  # neighbours do not depend on the scale
    _check_knn(x.shape[0], k, metric)
    return _knn(x, k, metric)


def _prep_knn(x: Tensor, k: int, metric: str) -> Tensor | None:
    return None if ut.centred(x) is None else _knn(x, k, metric)


def _pair_knn(nx: Tensor | None, ny: Tensor | None) -> float:
    if nx is None or ny is None:
        return ut.warn_degenerate("X" if nx is None else "Y", "mutual_knn", 0.0)
    k = nx.shape[1]
    hits = (nx[:, :, None] == ny[:, None, :]).any(-1).sum(1)
    return float(hits.to(torch.float64).mean() / k)


def mutual_knn(
    X: Float[Tensor, "n dx"],
    Y: Float[Tensor, "n dy"],
    k: int = 10,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean over items of |N_X(i) & N_Y(i)| / k.

    N_X(i) are the k nearest other rows of item i in X; metric "cosine" (rows L2-normalised,
    as in the paper) or "euclidean". 1 for identical neighbourhoods; about k / (n - 1) by chance.
    """
    x, y = ut.as_pair(X, Y, 3, "mutual_knn")
    _check_knn(x.shape[0], k, metric)
    return _pair_knn(_prep_knn(x, k, metric), _prep_knn(y, k, metric))


# -- RSA --------------------------------------------------------------------------------------
def rankdata(v: Float[Tensor, " m"]) -> Float[Tensor, " m"]:
    """1-based ranks of a 1-D tensor, ties get the average of their ranks (float64)."""
    if v.ndim != 1:
        raise ValueError(f"rankdata expects a 1-D tensor, got shape {tuple(v.shape)}")
    m = v.numel()
    sv, order = torch.sort(v, stable=True)
    new = torch.ones(m, dtype=torch.bool, device=v.device)
    new[1:] = sv[1:] != sv[:-1]
    gid = torch.cumsum(new, 0) - 1
    counts = torch.bincount(gid).to(torch.float64)
    starts = torch.cumsum(counts, 0) - counts
    avg = starts + (counts - 1.0) / 2.0 + 1.0
    ranks = torch.empty(m, dtype=torch.float64, device=v.device)
    ranks[order] = avg[gid]
    return ranks


def _standardized_ranks(v: Tensor) -> Tensor | None:
    r = rankdata(v)
    r = r - r.mean()
    nrm = torch.linalg.vector_norm(r)
    if float(nrm) == 0.0:
        return None
    return r / nrm


def spearman(u: Float[Tensor, " m"], v: Float[Tensor, " m"]) -> float:
    """Spearman rank correlation (Pearson correlation of average-tie ranks).

    A constant input has no ranking: returns 0.0 with a `DegenerateInputWarning`.
    """
    if u.shape != v.shape or u.ndim != 1 or u.numel() < 2:
        raise ValueError(
            f"spearman needs two 1-D tensors of equal length >= 2, got {tuple(u.shape)}, {tuple(v.shape)}"
        )
    ru, rv = _standardized_ranks(u.to(torch.float64)), _standardized_ranks(v.to(torch.float64))
    if ru is None or rv is None:
        return ut.warn_degenerate("u" if ru is None else "v", "Spearman correlation", 0.0)
    return ut.finite_or_raise((ru @ rv).clamp(-1.0, 1.0), "Spearman correlation")


def _rdm(x: Tensor, metric: str, name: str) -> Tensor:
    n = x.shape[0]
    if metric == "correlation":
        z = x - x.mean(1, keepdim=True)
        nrm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        bad = torch.nonzero(nrm.flatten() <= 1e-12 * x.abs().amax(1).clamp(min=1e-300)).flatten()
        if bad.numel():
            raise ValueError(
                f"{name} rows {bad[:8].tolist()} are constant across features: correlation distance "
                "is undefined for them; use metric='euclidean'"
            )
        z = z / nrm
        d = 1.0 - z @ z.T
    elif metric == "euclidean":
        xc = ut.center(x)
        sq = (xc * xc).sum(1)
        d = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp(min=0.0).sqrt()
    else:
        raise ValueError(f"metric must be 'correlation' or 'euclidean', got {metric!r}")
    iu = torch.triu_indices(n, n, 1, device=x.device)
    return d[iu[0], iu[1]]


def rdm(
    X: Float[Tensor, "n d"], metric: Literal["correlation", "euclidean"] = "correlation"
) -> Float[Tensor, " m"]:
    """Upper triangle (i < j, row-major) of the representational dissimilarity matrix, float64.

    "correlation": 1 - Pearson correlation between items' feature vectors; "euclidean": distance.
    """
    x = ut.as_matrix(X, "X")
    if x.shape[0] < 2:
        raise ValueError(f"rdm needs at least 2 rows, got {x.shape[0]}")
    e = ut.scale_exponent(x)  # computed at unit scale (no overflow); distances scaled back exactly
    d = _rdm(ut.scaled64(x, e), metric, "X")
    return torch.ldexp(d, torch.tensor(e, device=d.device)) if metric == "euclidean" and e else d


def _prep_rsa(x: Tensor, metric: str, name: str) -> Tensor | None:
    return None if ut.centred(x) is None else _standardized_ranks(_rdm(x, metric, name))


def _pair_rsa(rx: Tensor | None, ry: Tensor | None) -> float:
    if rx is None or ry is None:
        return ut.warn_degenerate("X" if rx is None else "Y", "RSA (its RDM is constant)", 0.0)
    return ut.finite_or_raise((rx @ ry).clamp(-1.0, 1.0), "RSA")


def rsa(
    X: Float[Tensor, "n dx"],
    Y: Float[Tensor, "n dy"],
    metric: Literal["correlation", "euclidean"] = "correlation",
) -> float:
    """Representational similarity analysis: Spearman correlation of the upper-triangular RDMs.

    "euclidean" RDMs make RSA invariant to rotations, shifts and isotropic scaling; "correlation"
    RDMs to per-item affine changes. A constant RDM (e.g. all rows identical) gives 0.0 with a
    `DegenerateInputWarning`.
    """
    x, y = ut.as_pair(X, Y, 3, "rsa")
    if metric not in ("correlation", "euclidean"):
        raise ValueError(f"metric must be 'correlation' or 'euclidean', got {metric!r}")
    return _pair_rsa(_prep_rsa(x, metric, "X"), _prep_rsa(y, metric, "Y"))
