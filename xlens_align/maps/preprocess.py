"""Per-side preprocessing of alignment maps, fitted from moments and stored in the map.

A `Preprocessor` maps one side's activations to the space where a map is solved:

    z = (clamp(x) - offset) @ D

- `clamp` (input side only): per-dimension thresholds ``lo <= x <= hi``, either computed at fit
  from the training rows (`column_quantiles`) or given precomputed;
- `offset`: the training mean when centring, else zero;
- `D`: identity, ``diag(1 / std)`` (standardizing) or the ZCA whitener
  ``(C + eps * mean_var * I)^{-1/2}`` (whitening; `C` the covariance, `eps` relative to the mean
  variance so it is scale-free).

`D` is symmetric in every mode, so `mul_left(M) = D @ M` is all the maps need to carry a
solution from preprocessed coordinates back to raw ones. On the output side the inverse
``x = z @ D^{-1} + offset`` de-standardizes / de-whitens predictions.

Means, standard deviations and covariances come from a `Moments` (count, mean, centred
co-moment), so preprocessing is fitted identically from raw tensors and from streamed
statistics. Quantiles cannot be streamed: clamping at a quantile needs the rows.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.stats import Moments

__all__ = ["Preprocessor", "column_quantiles", "make_preprocessors"]

Mode = Literal["none", "standardize", "whiten"]
_MODES = ("none", "standardize", "whiten")
_SIDES = {True: ("x", "y"), False: (), "both": ("x", "y"), "x": ("x",), "y": ("y",)}


def column_quantiles(x: Float[Tensor, "n d"], q: float, chunk: int = 256) -> Float[Tensor, " d"]:
    """Per-column quantile `q` of `x` (linear interpolation, as numpy's default), any size.

    Uses `kthvalue` on column blocks, so it works beyond `torch.quantile`'s size limit.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot compute quantiles of zero rows")
    pos = q * (n - 1)
    k = int(pos)
    frac = pos - k
    out = []
    for j in range(0, x.shape[1], chunk):
        block = x[:, j : j + chunk]
        lo = torch.kthvalue(block, k + 1, dim=0).values
        if frac > 0 and k + 1 < n:
            hi = torch.kthvalue(block, k + 2, dim=0).values
            lo = lo + frac * (hi - lo)
        out.append(lo)
    return torch.cat(out)


class Preprocessor:
    """Affine per-side preprocessing ``z = (clamp(x) - offset) @ D`` (see module docstring)."""

    def __init__(self, center: bool = True, mode: Mode = "none", eps: float = 1e-6) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.center = bool(center)
        self.mode = mode
        self.eps = float(eps)
        self.offset: Tensor | None = None
        self.scale: Tensor | None = None  # standardize: per-dim std
        self.whitener: Tensor | None = None  # whiten: D
        self.unwhitener: Tensor | None = None  # whiten: D^{-1}
        self.clamp_lo: Tensor | None = None
        self.clamp_hi: Tensor | None = None

    # -- fitting ------------------------------------------------------------------------------
    def set_clamp(self, lo: Tensor | float, hi: Tensor | float, d: int) -> Preprocessor:
        """Set clamp thresholds (scalars broadcast to all `d` dimensions)."""
        lo_t = torch.as_tensor(lo, dtype=torch.float64).flatten()
        hi_t = torch.as_tensor(hi, dtype=torch.float64).flatten()
        lo_t = lo_t.expand(d).clone() if lo_t.numel() == 1 else lo_t
        hi_t = hi_t.expand(d).clone() if hi_t.numel() == 1 else hi_t
        if lo_t.shape != (d,) or hi_t.shape != (d,):
            raise ValueError(
                f"clamp thresholds must be scalars or shape [{d}], got {tuple(lo_t.shape)} and {tuple(hi_t.shape)}"
            )
        if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()) or (lo_t > hi_t).any():
            raise ValueError("clamp thresholds must be finite with lo <= hi in every dimension")
        self.clamp_lo, self.clamp_hi = lo_t, hi_t
        return self

    def fit_moments(self, m: Moments) -> Preprocessor:
        """Fit offset and scale / whitener from a stream's moments (biased covariance S / n)."""
        if m.n < 1:
            raise ValueError("cannot fit preprocessing from zero rows")
        d = m.d
        dev = m.mean.device
        self.offset = m.mean.clone() if self.center else torch.zeros(d, dtype=torch.float64, device=dev)
        if self.clamp_lo is not None:
            self.clamp_lo, self.clamp_hi = self.clamp_lo.to(dev), self.clamp_hi.to(dev)
        cov = m.s / m.n
        if self.mode == "standardize":
            std = cov.diagonal().clamp_min(0).sqrt()
            self.scale = torch.where(std > 0, std, torch.ones_like(std))
        elif self.mode == "whiten":
            mean_var = float(cov.diagonal().mean())
            ridge = self.eps * (mean_var if mean_var > 0 else 1.0)
            lam, q = torch.linalg.eigh(cov + ridge * torch.eye(d, dtype=cov.dtype, device=dev))
            lam = lam.clamp_min(ridge)
            self.whitener = (q * lam.rsqrt()) @ q.T
            self.unwhitener = (q * lam.sqrt()) @ q.T
        return self

    @property
    def fitted(self) -> bool:
        return self.offset is not None

    @property
    def d(self) -> int:
        assert self.offset is not None
        return self.offset.shape[0]

    # -- application --------------------------------------------------------------------------
    def clamp(self, x: Tensor) -> Tensor:
        if self.clamp_lo is None:
            return x
        return torch.clamp(x, self.clamp_lo.to(x), self.clamp_hi.to(x))

    def forward(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """``(clamp(x) - offset) @ D`` in x's dtype and device."""
        z = self.clamp(x) - self.offset.to(x)
        if self.mode == "standardize":
            z = z / self.scale.to(x)
        elif self.mode == "whiten":
            z = z @ self.whitener.to(x)
        return z

    def inverse(self, z: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """``z @ D^{-1} + offset`` in z's dtype and device."""
        if self.mode == "standardize":
            z = z * self.scale.to(z)
        elif self.mode == "whiten":
            z = z @ self.unwhitener.to(z)
        return z + self.offset.to(z)

    def mul_left(self, m: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
        """``D @ m``."""
        if self.mode == "standardize":
            return m / self.scale.to(m)[:, None]
        if self.mode == "whiten":
            return self.whitener.to(m) @ m
        return m

    def inv_mul_left(self, m: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
        """``D^{-1} @ m``."""
        if self.mode == "standardize":
            return m * self.scale.to(m)[:, None]
        if self.mode == "whiten":
            return self.unwhitener.to(m) @ m
        return m

    def to(self, device: torch.device | str) -> Preprocessor:
        for name in ("offset", "scale", "whitener", "unwhitener", "clamp_lo", "clamp_hi"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # -- state --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {
            name: getattr(self, name)
            for name in ("offset", "scale", "whitener", "unwhitener", "clamp_lo", "clamp_hi")
            if getattr(self, name) is not None
        }
        return tensors, {"center": self.center, "mode": self.mode, "eps": self.eps}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], config: dict[str, Any]) -> Preprocessor:
        p = cls(center=config["center"], mode=config["mode"], eps=config["eps"])
        for name, t in tensors.items():
            if name not in ("offset", "scale", "whitener", "unwhitener", "clamp_lo", "clamp_hi"):
                raise ValueError(f"unexpected preprocessing tensor {name!r}")
            setattr(p, name, t)
        if p.offset is None:
            raise ValueError("preprocessing state lacks its offset")
        need = {"standardize": ("scale",), "whiten": ("whitener", "unwhitener"), "none": ()}[p.mode]
        missing = [n for n in need if getattr(p, n) is None]
        if missing:
            raise ValueError(f"preprocessing state for mode {p.mode!r} lacks {missing}")
        return p

    def __repr__(self) -> str:
        clamp = ", clamp" if self.clamp_lo is not None else ""
        return f"Preprocessor(center={self.center}, mode={self.mode!r}{clamp})"


def _sides(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.lower()
    if value not in _SIDES:
        raise ValueError(f"{name} must be True, False, 'x', 'y' or 'both', got {value!r}")
    return _SIDES[value]


def make_preprocessors(
    center: bool, standardize: Any, whiten: Any, whiten_eps: float
) -> tuple[Preprocessor, Preprocessor]:
    """Unfitted (input, target) preprocessors from a map's hyper-parameters."""
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {center!r}")
    if not (isinstance(whiten_eps, int | float) and whiten_eps >= 0):
        raise ValueError(f"whiten_eps must be a float >= 0, got {whiten_eps!r}")
    st, wh = _sides(standardize, "standardize"), _sides(whiten, "whiten")
    both = sorted(set(st) & set(wh))
    if both:
        raise ValueError(
            f"standardize and whiten both requested for side(s) {both}: whitening already standardizes"
        )
    out = []
    for side in ("x", "y"):
        mode: Mode = "whiten" if side in wh else "standardize" if side in st else "none"
        out.append(Preprocessor(center=center, mode=mode, eps=whiten_eps))
    return out[0], out[1]
