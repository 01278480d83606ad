"""Per-side preprocessing of alignment maps, fitted from moments and stored in the map.

A `Preprocessor` maps one side's activations to the space where a map is solved:

    z = (winsorize(x) - offset) @ D

- `winsorize` (input side only): per-dimension thresholds ``lo <= x <= hi``, either computed at
  fit from the training rows (`column_quantiles`) or given precomputed. (In this package's
  vocabulary *clamp* is only the row filter that clips values to [-c, c], see `rows.py`.);
- `offset`: the training mean when centring, else zero;
- `D`: identity, ``diag(1 / std)`` (standardizing) or the ZCA whitener
  ``(C + eps * mean_var * I)^{-1/2}`` (whitening; `C` the covariance, `eps` relative to the mean
  variance so it is scale-free).

`D` is symmetric in every mode, so `mul_left(M) = D @ M` is all the maps need to carry a
solution from preprocessed coordinates back to raw ones. On the output side the inverse
``x = z @ D^{-1} + offset`` de-standardizes / de-whitens predictions.

Means, standard deviations and covariances come from a `Moments` (count, mean, centred
co-moment), so preprocessing is fitted identically from raw tensors and from streamed
statistics. Quantiles cannot be streamed: winsorizing at a quantile needs the rows.

`PreprocessingParams` is the mixin that gives a map the five preprocessing hyper-parameters
(``center``, ``standardize``, ``whiten``, ``whiten_eps``, ``winsorize``), declared, defaulted,
validated and turned into `Preprocessor` pairs in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypedDict

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.stats import Moments
from xlens_align.validate import nonneg_float

__all__ = [
    "PREPROCESSING",
    "Preprocessing",
    "PreprocessingParams",
    "Preprocessor",
    "column_quantiles",
    "make_preprocessors",
    "rename_legacy_params",
]

Mode = Literal["none", "standardize", "whiten"]
_MODES = ("none", "standardize", "whiten")
_SIDES = {True: ("x", "y"), False: (), "both": ("x", "y"), "x": ("x",), "y": ("y",)}
_TENSORS = ("offset", "scale", "whitener", "unwhitener", "winsor_lo", "winsor_hi")
_LEGACY_TENSORS = {"clamp_lo": "winsor_lo", "clamp_hi": "winsor_hi"}  # files written before the rename


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
    """Affine per-side preprocessing ``z = (winsorize(x) - offset) @ D`` (see module docstring)."""

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
        self.winsor_lo: Tensor | None = None
        self.winsor_hi: Tensor | None = None

    # -- fitting ------------------------------------------------------------------------------
    def set_winsor(self, lo: Tensor | float, hi: Tensor | float, d: int) -> Preprocessor:
        """Set winsorizing thresholds (scalars broadcast to all `d` dimensions)."""
        lo_t = torch.as_tensor(lo, dtype=torch.float64).flatten()
        hi_t = torch.as_tensor(hi, dtype=torch.float64).flatten()
        lo_t = lo_t.expand(d).clone() if lo_t.numel() == 1 else lo_t
        hi_t = hi_t.expand(d).clone() if hi_t.numel() == 1 else hi_t
        if lo_t.shape != (d,) or hi_t.shape != (d,):
            raise ValueError(
                f"winsorize thresholds must be scalars or shape [{d}], got {tuple(lo_t.shape)} and "
                f"{tuple(hi_t.shape)}"
            )
        if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()) or (lo_t > hi_t).any():
            raise ValueError("winsorize thresholds must be finite with lo <= hi in every dimension")
        self.winsor_lo, self.winsor_hi = lo_t, hi_t
        return self

    def fit_moments(self, m: Moments) -> Preprocessor:
        """Fit offset and scale / whitener from a stream's moments (biased covariance S / n)."""
        if m.n < 1:
            raise ValueError("cannot fit preprocessing from zero rows")
        d = m.d
        dev = m.mean.device
        self.offset = m.mean.clone() if self.center else torch.zeros(d, dtype=torch.float64, device=dev)
        if self.winsor_lo is not None:
            self.winsor_lo, self.winsor_hi = self.winsor_lo.to(dev), self.winsor_hi.to(dev)
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
    def winsorize(self, x: Tensor) -> Tensor:
        """x with each dimension clipped to its [lo, hi] thresholds (x itself when there are none)."""
        if self.winsor_lo is None:
            return x
        return torch.clamp(x, self.winsor_lo.to(x), self.winsor_hi.to(x))

    def forward(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """``(winsorize(x) - offset) @ D`` in x's dtype and device."""
        z = self.winsorize(x) - self.offset.to(x)
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
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def copy(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Preprocessor:
        """An independent copy (tensors cloned, optionally cast to `dtype` / moved to `device`)."""
        tensors, cfg = self.state()
        return Preprocessor.from_state(
            {
                k: v.to(dtype=dtype or v.dtype, device=device or v.device, copy=True)
                for k, v in tensors.items()
            },
            cfg,
        )

    # -- state --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {name: getattr(self, name) for name in _TENSORS if getattr(self, name) is not None}
        return tensors, {"center": self.center, "mode": self.mode, "eps": self.eps}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> Preprocessor:
        """Rebuild from `state()` (also reads the ``clamp_lo`` / ``clamp_hi`` names of older files)."""
        p = cls(center=config["center"], mode=config["mode"], eps=config["eps"])
        for name, t in tensors.items():
            name = _LEGACY_TENSORS.get(name, name)
            if name not in _TENSORS:
                raise ValueError(f"unexpected preprocessing tensor {name!r}")
            setattr(p, name, t)
        if p.offset is None:
            raise ValueError("preprocessing state lacks its offset")
        need = {"standardize": ("scale",), "whiten": ("whitener", "unwhitener"), "none": ()}[p.mode]
        missing = [n for n in need if getattr(p, n) is None]
        if missing:
            raise ValueError(f"preprocessing state for mode {p.mode!r} lacks {missing}")
        return p

    @staticmethod
    def tensor_shapes(config: Mapping[str, Any], d: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(required, optional) tensor name -> shape of a saved preprocessor of `config` on `d` dims
        (None: shapes unknown, only names checked); older files' ``clamp_*`` names are optional too."""
        vec, mat = (d,) if d is not None else None, (d, d) if d is not None else None
        mode = config.get("mode", "none")
        need = {"offset": vec, **({"scale": vec} if mode == "standardize" else {})}
        if mode == "whiten":
            need.update(whitener=mat, unwhitener=mat)
        return need, {name: vec for name in ("winsor_lo", "winsor_hi", *_LEGACY_TENSORS)}

    def __repr__(self) -> str:
        winsor = ", winsorize" if self.winsor_lo is not None else ""
        return f"Preprocessor(center={self.center}, mode={self.mode!r}{winsor})"


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
    nonneg_float(whiten_eps, "whiten_eps")
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


# -- the five preprocessing hyper-parameters, declared once --------------------------------------
class Preprocessing(TypedDict, total=False):
    """Keyword arguments every preprocessed map accepts (see `PreprocessingParams`)."""

    center: bool
    standardize: bool | str
    whiten: bool | str
    whiten_eps: float
    winsorize: float | tuple[Any, Any] | None


PREPROCESSING: Mapping[str, Any] = MappingProxyType(
    {"center": True, "standardize": False, "whiten": False, "whiten_eps": 1e-6, "winsorize": None}
)
"""Names and defaults of the preprocessing hyper-parameters."""

_WINSOR_MARKER = {"thresholds": "stored as prep_x_.winsor_lo / prep_x_.winsor_hi"}


def rename_legacy_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as saved by older versions, in today's names (``clamp`` -> ``winsorize``)."""
    out = dict(params)
    if "clamp" in out and "winsorize" not in out:
        out["winsorize"] = out.pop("clamp")
    return out


class PreprocessingParams:
    """Mixin of a map whose data pass through a pair of `Preprocessor` (input, target).

    Hyper-parameters (keywords of the map's constructor, listed by ``get_params``):

    - ``center`` (default True): subtract the training means; off: no intercept.
    - ``standardize`` / ``whiten``: True or ``"both"``, ``"x"``, ``"y"`` or False: divide by the
      per-dimension std / ZCA-whiten (``whiten_eps`` ridge, relative to the mean variance).
    - ``winsorize`` (input side): a quantile q in (0.5, 1) clips each dimension of X to its
      [1-q, q] training quantiles; or precomputed ``(lo, hi)`` thresholds (scalars or [d_in]), the
      only form usable with streamed statistics, which must then come from activations winsorized
      the same way. None: off.

    A subclass's constructor takes ``**preprocessing: Unpack[Preprocessing]`` and calls
    ``self._set_preprocessing(preprocessing)``.
    """

    extra_params: ClassVar[Mapping[str, Any]] = PREPROCESSING

    center: bool
    standardize: bool | str
    whiten: bool | str
    whiten_eps: float
    winsorize: float | tuple[Any, Any] | None

    def _set_preprocessing(self, options: Mapping[str, Any]) -> None:
        """Store the preprocessing keywords (defaults for the missing ones); refuse unknown ones."""
        unknown = sorted(set(options) - set(PREPROCESSING))
        if "clamp" in unknown:
            raise TypeError(
                f"{type(self).__name__}: the map hyper-parameter clamp= is now winsorize= (per-dimension "
                "quantile q or (lo, hi) thresholds); clamp= means clipping values to [-c, c] when rows are "
                "collected (xlens_align.rows)"
            )
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; its preprocessing "
                f"keywords are {list(PREPROCESSING)}"
            )
        for name, default in PREPROCESSING.items():
            setattr(self, name, options.get(name, default))

    def _winsor_thresholds(self, X: Tensor | None) -> tuple[Any, Any] | None:
        """(lo, hi) from ``winsorize`` (quantiles of the training rows `X`), None when off."""
        w = self.winsorize
        if w is None:
            return None
        if isinstance(w, tuple | list):
            if len(w) != 2:
                raise ValueError(f"winsorize thresholds must be a pair (lo, hi), got {len(w)} items")
            return w[0], w[1]
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.5 < w < 1.0:
            raise ValueError(
                f"winsorize must be None, a quantile in (0.5, 1) or a pair (lo, hi) of thresholds, got {w!r}"
            )
        if X is None:
            raise ValueError(
                f"winsorize={w} clips at per-dimension quantiles of the training rows, which streamed "
                "statistics cannot provide: fit(X, Y) on tensors, or pass precomputed thresholds "
                "winsorize=(lo, hi) and accumulate the statistics on activations winsorized with them"
            )
        return column_quantiles(X, 1.0 - w), column_quantiles(X, w)

    def _preprocessors(self, X: Tensor | None, d_in: int) -> tuple[Preprocessor, Preprocessor]:
        """Unfitted (input, target) preprocessors; `X`: the training rows (None when streamed)."""
        px, py = make_preprocessors(self.center, self.standardize, self.whiten, self.whiten_eps)
        thresholds = self._winsor_thresholds(X)
        if thresholds is not None:
            px.set_winsor(thresholds[0], thresholds[1], d_in)
        return px, py

    # -- persistence: thresholds live in prep_x_'s tensors ------------------------------------
    def _param_to_json(self, name: str, value: Any) -> Any:
        if name == "winsorize" and isinstance(value, tuple | list):
            return dict(_WINSOR_MARKER)
        return super()._param_to_json(name, value)  # type: ignore[misc]

    @classmethod
    def _params_from_json(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        params = rename_legacy_params(params)
        if isinstance(params.get("winsorize"), dict):
            lo = tensors.get("prep_x_.winsor_lo", tensors.get("prep_x_.clamp_lo"))
            hi = tensors.get("prep_x_.winsor_hi", tensors.get("prep_x_.clamp_hi"))
            if lo is None or hi is None:
                raise ValueError("the saved winsorize thresholds are missing from prep_x_'s tensors")
            params["winsorize"] = (lo, hi)
        return super()._params_from_json(params, tensors)  # type: ignore[misc]
