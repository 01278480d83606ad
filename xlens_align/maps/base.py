"""Base class, registry and shared helpers of alignment maps.

Every map follows scikit-learn's estimator contract: the constructor stores hyper-parameters
only (`get_params` reads them back from the constructor's signature), `fit(X, Y)` returns self,
fitted state lives in attributes ending in ``_`` and `transform` / `score` use it.

Subclasses implement `_fit(X, Y)` (raw tensors, already validated) and `_predict64(X)` (float64
prediction, input already validated), and optionally `fit_stats(stats)` for maps with a closed
form in the second moments. Saving is generic: tensor attributes ending in ``_`` become
safetensors entries, JSON-able ones go into the metadata, `Preprocessor` and `nn.Module`
attributes are flattened (a subclass with a module rebuilds it in `_build_module`).
Register a new kind with ``@register("name")`` so `load` can rebuild it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from xlens_align.maps.preprocess import Preprocessor, column_quantiles, make_preprocessors
from xlens_align.stats import CrossStats, check_finite

__all__ = [
    "AlignmentMap",
    "NotFittedError",
    "register",
    "registry",
    "regression_scores",
    "split_indices",
]

PROVENANCE_KEYS = (
    "source",
    "target",
    "model_id_a",
    "config_hash_a",
    "model_id_b",
    "config_hash_b",
    "alignment",
    "positions",
    "bridge_mode",
    "library_version",
)


class NotFittedError(ValueError):
    """A map was used (transform, score, save) before `fit`."""


_REGISTRY: dict[str, type[AlignmentMap]] = {}
registry: Mapping[str, type[AlignmentMap]] = MappingProxyType(_REGISTRY)
"""Read-only view kind -> class of every registered map kind."""

M = TypeVar("M", bound="type[AlignmentMap]")


def register(kind: str) -> Callable[[M], M]:
    """Class decorator: register an `AlignmentMap` subclass under `kind` (used by `load`)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, AlignmentMap)):
            raise TypeError(f"@register({kind!r}) needs an AlignmentMap subclass, got {cls!r}")
        old = _REGISTRY.get(kind)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"map kind {kind!r} is already registered to {old.__module__}.{old.__qualname__}"
            )
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


# -- input checks -------------------------------------------------------------------------------
def check_matrix(x: Any, name: str) -> Tensor:
    """`x` must be a finite floating [n, d] tensor; returns it unchanged."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def check_pair(X: Any, Y: Any, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    """Validate a paired (X [n, d_A], Y [n, d_B]) sample."""
    X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (paired samples), got {X.shape[0]} and {Y.shape[0]}"
        )
    if X.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} paired rows, got {X.shape[0]}")
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(
            f"X and Y need at least one column, got shapes {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    return X, Y


def split_indices(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic (train, validation) row indices: a seeded permutation, `fraction` held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to hold some out, got {n}")
    n_val = min(max(1, round(fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def stats_of(X: Tensor, Y: Tensor, chunk: int = 16384) -> CrossStats:
    """float64 `CrossStats` of (X, Y), accumulated in row chunks to bound the float64 copies."""
    st = CrossStats.empty(X.shape[1], Y.shape[1], device=X.device)
    for i in range(0, X.shape[0], chunk):
        st.update(X[i : i + chunk], Y[i : i + chunk])
    return st


def regression_scores(Y_hat: Float[Tensor, "n d"], Y: Float[Tensor, "n d"]) -> dict[str, float]:
    """Held-out scores of predictions (float64): r2, r2_mean, fvu, cosine, mse, n."""
    Y_hat, Y = Y_hat.double(), Y.double()
    resid = Y - Y_hat
    sse_j = resid.square().sum(0)
    sst_j = (Y - Y.mean(0)).square().sum(0)
    sse, sst = float(sse_j.sum()), float(sst_j.sum())
    if sst <= 0:
        raise ValueError("Y has zero variance: R^2 is undefined")
    ok = sst_j > 0
    return {
        "r2": 1.0 - sse / sst,
        "r2_mean": float((1.0 - sse_j[ok] / sst_j[ok]).mean()),
        "fvu": sse / sst,
        "cosine": float(F.cosine_similarity(Y_hat, Y, dim=1, eps=1e-12).mean()),
        "mse": sse / Y.numel(),
        "n": int(Y.shape[0]),
    }


def _jsonable(value: Any, what: str) -> Any:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable, got {value!r} ({e})") from None
    return value


# -- the base class -----------------------------------------------------------------------------
class AlignmentMap:
    """A map from a residual point of model A to one of model B, ``Y_hat = f(X)``.

    Fitted attributes common to all kinds: ``d_in_``, ``d_out_``, ``n_samples_``.
    `provenance` (what the map was fit on) is set with `bind`.
    """

    kind: ClassVar[str] = ""

    # -- hyper-parameters ---------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor hyper-parameters (scikit-learn style)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> AlignmentMap:
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ValueError(
                    f"{type(self).__name__} has no hyper-parameter {k!r}; valid: {sorted(valid)}"
                )
            setattr(self, k, v)
        return self

    def clone(self) -> AlignmentMap:
        """An unfitted copy with the same hyper-parameters (provenance kept)."""
        new = type(self)(**self.get_params())
        new._provenance = dict(self.provenance)
        return new

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self"
        }
        shown = []
        for k, v in self.get_params().items():
            d = defaults.get(k, inspect.Parameter.empty)
            if d is inspect.Parameter.empty or isinstance(v, Tensor) or isinstance(d, Tensor) or v != d:
                shown.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _params_json(self) -> dict[str, Any]:
        """Hyper-parameters as JSON (tuples -> lists; clamp thresholds -> a marker, tensors saved)."""
        out = {}
        for k, v in self.get_params().items():
            if k == "clamp" and isinstance(v, tuple | list):
                v = {"thresholds": "stored as prep_x_.clamp_lo / prep_x_.clamp_hi"}
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = _jsonable(v, f"hyper-parameter {k!r}")
        return out

    @classmethod
    def _params_from_json(cls, params: dict[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        out = {}
        for k, v in params.items():
            if k == "clamp" and isinstance(v, dict):
                v = (tensors["prep_x_.clamp_lo"], tensors["prep_x_.clamp_hi"])
            elif isinstance(v, list):
                v = tuple(v)
            out[k] = v
        return out

    # -- provenance ---------------------------------------------------------------------------
    @property
    def provenance(self) -> dict[str, Any]:
        """What the map was fit on (see `bind`); always carries ``library_version``."""
        prov = self.__dict__.setdefault("_provenance", {})
        if "library_version" not in prov:
            from xlens_align import __version__

            prov["library_version"] = __version__
        return prov

    def bind(self, a: Any = None, b: Any = None, **info: Any) -> AlignmentMap:
        """Record provenance; returns self.

        `a` / `b`: model objects with ``.model_id`` and ``.config_hash`` (sets ``model_id_a``,
        ``config_hash_a``, ...). Other keywords are stored as given (JSON values), usually
        ``source``/``target`` point names, ``alignment`` policy, ``positions`` filter and
        ``bridge_mode``; `load(path, a=..., b=...)` checks the model ids and hashes.
        """
        prov = self.provenance
        for side, model in (("a", a), ("b", b)):
            if model is None:
                continue
            missing = [attr for attr in ("model_id", "config_hash") if not hasattr(model, attr)]
            if missing:
                raise TypeError(f"{side} must have .model_id and .config_hash attributes; missing {missing}")
            prov[f"model_id_{side}"] = _jsonable(model.model_id, f"{side}.model_id")
            prov[f"config_hash_{side}"] = _jsonable(model.config_hash, f"{side}.config_hash")
        for k, v in info.items():
            prov[k] = _jsonable(v, f"provenance {k!r}")
        return self

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"]) -> AlignmentMap:
        """Fit on paired rows X [n, d_A], Y [n, d_B]; returns self."""
        X, Y = check_pair(X, Y)
        self._fit(X, Y)
        return self

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement fitting on tensors")

    def fit_stats(self, stats: CrossStats, **kwargs: Any) -> AlignmentMap:
        """Fit from streamed second moments (closed-form kinds only)."""
        raise TypeError(
            f"{type(self).__name__} has no closed form in the second moments; fit it with fit(X, Y)"
            + (" or fit_stream(...)" if hasattr(self, "fit_stream") else "")
        )

    def _resolve_clamp(self, X: Tensor | None, d: int) -> tuple[Tensor, Tensor] | None:
        """Clamp thresholds for the input side, from hyper-parameter `clamp` (None when off)."""
        c = getattr(self, "clamp", None)
        if c is None:
            return None
        if isinstance(c, tuple | list):
            if len(c) != 2:
                raise ValueError(f"clamp thresholds must be a pair (lo, hi), got {len(c)} items")
            return c[0], c[1]
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.5 < c < 1.0:
            raise ValueError(
                f"clamp must be None, a quantile in (0.5, 1) or a pair (lo, hi) of thresholds, got {c!r}"
            )
        if X is None:
            raise ValueError(
                f"clamp={c} clamps at per-dimension quantiles of the training rows, which streamed statistics "
                "cannot provide: fit(X, Y) on tensors, or pass precomputed thresholds clamp=(lo, hi) and "
                "accumulate the statistics on activations clamped with them"
            )
        return column_quantiles(X, 1.0 - c), column_quantiles(X, c)

    def _preprocessors(
        self, thresholds: tuple[Any, Any] | None, d_in: int
    ) -> tuple[Preprocessor, Preprocessor]:
        """Unfitted (input, target) preprocessors from the hyper-parameters ``center``,
        ``standardize``, ``whiten``, ``whiten_eps`` and the resolved clamp `thresholds`."""
        px, py = make_preprocessors(self.center, self.standardize, self.whiten, self.whiten_eps)
        if thresholds is not None:
            px.set_clamp(thresholds[0], thresholds[1], d_in)
        return px, py

    # -- using a fitted map -------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "d_in_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X, Y) first")

    def _check_input(self, X: Any, name: str = "X") -> Tensor:
        if not isinstance(X, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape [..., {self.d_in_}], got {type(X).__name__}"
            )
        if X.ndim < 1 or X.shape[-1] != self.d_in_:
            raise ValueError(
                f"{name} must have last dimension d_in={self.d_in_} (the map was fit on {self.d_in_}-dim inputs), "
                f"got shape {tuple(X.shape)}"
            )
        check_finite(X.reshape(-1, X.shape[-1]), name)
        return X

    def transform(self, X: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Map X [..., d_in] to [..., d_out], in X's dtype and on X's device."""
        self._check_fitted()
        X = self._check_input(X)
        flat = X.reshape(-1, X.shape[-1])
        out = self._predict64(flat)
        return out.to(dtype=X.dtype, device=X.device).reshape(*X.shape[:-1], self.d_out_)

    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        raise NotImplementedError

    def score(self, X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"]) -> dict[str, float]:
        """Held-out fit quality: ``r2`` (variance-weighted 1 - SSE/SST), ``r2_mean`` (per-dim
        average), ``fvu`` (= 1 - r2), ``cosine`` (mean row cosine of prediction and target),
        ``mse`` and ``n``; computed in float64."""
        self._check_fitted()
        X, Y = check_pair(X, Y)
        X = self._check_input(X)
        if Y.shape[1] != self.d_out_:
            raise ValueError(f"Y must have d_out={self.d_out_} columns, got shape {tuple(Y.shape)}")
        return regression_scores(self._predict64(X), Y.to(X.device))

    def to(self, device: torch.device | str) -> AlignmentMap:
        """Move fitted tensors to `device` (do this once before using the map in a hook)."""
        for k, v in list(vars(self).items()):
            if not k.endswith("_") or k.startswith("_"):
                continue
            if isinstance(v, Tensor | nn.Module | Preprocessor):
                setattr(self, k, v.to(device))
        return self

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata); see `xlens_align.maps.io`."""
        from xlens_align.maps.io import save_map

        return save_map(self, path)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Fitted state: (tensors by name, JSON values by name)."""
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, Any] = {}
        for k, v in vars(self).items():
            if not k.endswith("_") or k.startswith("_"):
                continue
            if isinstance(v, Tensor):
                tensors[k] = v
            elif isinstance(v, Preprocessor):
                t, cfg = v.state()
                tensors.update({f"{k}.{n}": x for n, x in t.items()})
                scalars[k] = {"__preprocessor__": cfg}
            elif isinstance(v, nn.Module):
                tensors.update({f"{k}.{n}": x for n, x in v.state_dict().items()})
                scalars[k] = {"__module__": type(v).__name__}
            else:
                scalars[k] = _jsonable(v, f"fitted attribute {k!r}")
        return tensors, scalars

    def _load_state(self, tensors: Mapping[str, Tensor], scalars: Mapping[str, Any]) -> None:
        groups: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            if rest:
                groups.setdefault(head, {})[rest] = t
            else:
                setattr(self, head, t)
        for k, v in scalars.items():
            if isinstance(v, dict) and "__preprocessor__" in v:
                setattr(self, k, Preprocessor.from_state(groups.pop(k, {}), v["__preprocessor__"]))
            elif isinstance(v, dict) and "__module__" in v:
                setattr(self, k, v)  # placeholder until built below
            else:
                setattr(self, k, v)
        for k, v in scalars.items():
            if isinstance(v, dict) and "__module__" in v:
                module = self._build_module(k)
                module.load_state_dict(groups.pop(k, {}), strict=True)
                module.eval()
                setattr(self, k, module)
        if groups:
            raise ValueError(f"unexpected tensor groups in map state: {sorted(groups)}")

    def _build_module(self, name: str) -> nn.Module:
        raise ValueError(f"{type(self).__name__} cannot rebuild module attribute {name!r}")
