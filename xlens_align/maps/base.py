"""Base class, registry, scores and loading of alignment maps.

Every map follows scikit-learn's estimator contract: the constructor stores hyper-parameters
only (`get_params` reads them back from the constructor's signature, plus the names a mixin
declares in ``extra_params``, e.g. the preprocessing keywords of `PreprocessingParams`),
`fit(X, Y)` returns self, fitted state lives in attributes ending in ``_`` and `transform` /
`score` use it.

Subclasses implement `_fit(X, Y)` (raw tensors, already validated) and `_predict64(X)` (float64
prediction, input already validated), and optionally `fit_stats(stats)` for maps with a closed
form in the second moments. Saving is generic: tensor attributes ending in ``_`` become
safetensors entries, JSON-able ones go into the metadata, `Preprocessor` and `nn.Module`
attributes are flattened (a subclass with a module rebuilds it in `_build_module`); the file
format itself is `maps.io`'s. Register a new kind with ``@register("name")`` so `load` can
rebuild it.
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

from xlens_align.maps import io
from xlens_align.maps.preprocess import Preprocessor
from xlens_align.stats import CrossStats
from xlens_align.validate import check_finite, check_pair

__all__ = [
    "AlignmentMap",
    "NotFittedError",
    "error_scores",
    "load",
    "register",
    "registry",
    "regression_scores",
]

PROVENANCE_KEYS = tuple(
    "source target model_id_a config_hash_a model_id_b config_hash_b alignment positions bridge_mode "
    "library_version".split()
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


# -- scores: one definition for predictions and for moments --------------------------------------
def error_scores(sse_j: Float[Tensor, " d"], sst_j: Float[Tensor, " d"], n: int) -> dict[str, float]:
    """Scores from per-dimension squared errors ``sse_j = sum_i (y_ij - y_hat_ij)^2`` and total sums
    of squares ``sst_j = sum_i (y_ij - mean_j)^2`` over `n` rows: ``r2`` (variance-weighted
    1 - SSE/SST), ``r2_mean`` (per-dimension R^2 averaged over dimensions with variance), ``fvu``
    (= 1 - r2), ``mse`` (per entry) and ``n``. `regression_scores` and `LinearMap.score_stats`
    both end here."""
    sse, sst = float(sse_j.sum()), float(sst_j.sum())
    if sst <= 0:
        raise ValueError("Y has zero variance: R^2 is undefined")
    ok = sst_j > 0
    return {
        "r2": 1.0 - sse / sst,
        "r2_mean": float((1.0 - sse_j[ok] / sst_j[ok]).mean()),
        "fvu": sse / sst,
        "mse": sse / (n * sse_j.shape[0]),
        "n": int(n),
    }


def regression_scores(Y_hat: Float[Tensor, "n d"], Y: Float[Tensor, "n d"]) -> dict[str, float]:
    """Held-out scores of predictions, in float64: `error_scores` plus ``cosine`` (mean row cosine
    of prediction and target)."""
    if Y_hat.shape != Y.shape or Y.ndim != 2:
        raise ValueError(
            f"Y_hat and Y must have the same shape [n, d], got {tuple(Y_hat.shape)} and {tuple(Y.shape)}"
        )
    Y_hat, Y = Y_hat.double(), Y.double().to(Y_hat.device)
    sse_j = (Y - Y_hat).square().sum(0)
    sst_j = (Y - Y.mean(0)).square().sum(0)
    out = error_scores(sse_j, sst_j, Y.shape[0])
    out["cosine"] = float(F.cosine_similarity(Y_hat, Y, dim=1, eps=1e-12).mean())
    return out


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
    extra_params: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Hyper-parameters taken through ``**kwargs`` (declared by a mixin): name -> default."""

    # -- hyper-parameters ---------------------------------------------------------------------
    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        """Every hyper-parameter -> its default (`inspect.Parameter.empty` when required)."""
        sig = inspect.signature(cls.__init__)
        out = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        return {**out, **{k: v for k, v in cls.extra_params.items() if k not in out}}

    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._param_defaults())

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
        defaults = self._param_defaults()
        shown = []
        for k, v in self.get_params().items():
            d = defaults.get(k, inspect.Parameter.empty)
            if d is inspect.Parameter.empty or isinstance(v, Tensor) or isinstance(d, Tensor) or v != d:
                shown.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _param_to_json(self, name: str, value: Any) -> Any:
        """One hyper-parameter as JSON (tuples -> lists); subclasses handle non-JSON values."""
        return _jsonable(list(value) if isinstance(value, tuple) else value, f"hyper-parameter {name!r}")

    def _params_json(self) -> dict[str, Any]:
        """Hyper-parameters as JSON (see `_param_to_json`)."""
        return {k: self._param_to_json(k, v) for k, v in self.get_params().items()}

    @classmethod
    def _params_from_json(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor keywords from saved JSON params (lists -> tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}

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
            model_id, config_hash = io.model_identity(model, side)
            prov[f"model_id_{side}"] = _jsonable(model_id, f"{side}.model_id")
            prov[f"config_hash_{side}"] = _jsonable(config_hash, f"{side}.config_hash")
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
        """Held-out fit quality in float64 (`regression_scores`): ``r2``, ``r2_mean``, ``fvu``,
        ``mse``, ``n`` (`error_scores`) and ``cosine``."""
        self._check_fitted()
        X, Y = check_pair(X, Y)
        X = self._check_input(X)
        if Y.shape[1] != self.d_out_:
            raise ValueError(f"Y must have d_out={self.d_out_} columns, got shape {tuple(Y.shape)}")
        return regression_scores(self._predict64(X), Y)

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
        """Write one safetensors file (tensors + JSON metadata, atomically); see `xlens_align.maps.io`."""
        if not self.is_fitted:
            raise NotFittedError(f"cannot save an unfitted {type(self).__name__}: call fit first")
        if not self.kind or registry.get(self.kind) is not type(self):
            raise ValueError(
                f"{type(self).__name__} is not a registered map kind; decorate it with @register('name')"
            )
        tensors, scalars = self._state()
        return io.write_map_file(
            path,
            kind=self.kind,
            params=self._params_json(),
            state=scalars,
            provenance=self.provenance,
            tensors=tensors,
        )

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
        for k, v in scalars.items():
            setattr(self, k, v)  # preprocessors and modules are placeholders until rebuilt below
        marked = {
            tag: {k: v[tag] for k, v in scalars.items() if isinstance(v, dict) and tag in v}
            for tag in ("__preprocessor__", "__module__")
        }
        preps, modules = marked["__preprocessor__"], {k: self._build_module(k) for k in marked["__module__"]}
        shapes = {f"{k}.{n}": tuple(t.shape) for k, m in modules.items() for n, t in m.state_dict().items()}
        shapes.update(self._tensor_shapes())
        io.check_map_tensors(tensors, shapes, preps, self.kind, self.d_in_, self.d_out_)
        groups: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            if rest:
                groups.setdefault(head, {})[rest] = t
            else:
                setattr(self, head, t)
        for k, cfg in preps.items():
            setattr(self, k, Preprocessor.from_state(groups.get(k, {}), cfg))
        for k, module in modules.items():
            state = groups.get(k, {})
            if state:  # built on the CPU: follow the tensors to the device `load` was given
                module.to(next(iter(state.values())).device)
            module.load_state_dict(state, strict=True)
            setattr(self, k, module.eval())

    def _tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each plain fitted tensor of the kind (`load` checks them and the rest)."""
        return {}

    def _build_module(self, name: str) -> nn.Module:
        raise ValueError(f"{type(self).__name__} cannot rebuild module attribute {name!r}")


def load(
    path: str | Path,
    a: Any = None,
    b: Any = None,
    device: str | torch.device = "cpu",
) -> AlignmentMap:
    """Rebuild a saved map. With `a` / `b` (objects with ``.model_id`` and ``.config_hash``),
    refuse a file whose recorded source / target model differs."""
    path = Path(path)
    meta = io.read_metadata(path)
    kind = meta["kind"]
    cls = registry.get(kind)
    if cls is None:
        raise ValueError(f"{path} holds a map of unknown kind {kind!r}; known kinds: {sorted(registry)}")
    prov = meta["provenance"]
    io.check_model(path, prov, "a", a)
    io.check_model(path, prov, "b", b)
    tensors = io.read_tensors(path, device)
    try:
        m = cls(**cls._params_from_json(meta["params"], tensors))
        m._load_state(tensors, meta["state"])
    except io.MapContentError as e:
        raise ValueError(f"{path}: {e}") from None
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path}: cannot rebuild the {kind!r} map from its contents ({type(e).__name__}: {e})"
        ) from e
    m._provenance = dict(prov)
    if not m.is_fitted:
        raise ValueError(f"{path}: the stored {kind!r} map lacks its fitted state")
    return m
