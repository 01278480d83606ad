"""Embedding injection: A's activation mapped into B's input embedding space (a negative baseline).

The map is fitted like its base map, on pairs (X = A's `source` point, Y = B's ``"embed"``
point), and applied at B's ``"embed"`` point: the mapped vector replaces B's token embedding at
the aligned positions and B runs from the start on it. B then has to re-derive from one
embedding-space vector everything A had computed by layer N, which it cannot: this is the
control that a map into B's middle layers should beat in next-token loss recovered.

Its provenance target is always ``"embed"``, so effects code that patches a map at its
provenance target measures it beside the other maps.

It is an estimator like the others (`fit(X, Y)`, `fit_stats`); collecting X and Y from a
`ModelPair` is the pipelines' work (`xlens_align.fitting`).

>>> inj = EmbeddingInjection("affine", {"alpha": "cv"}).fit(X, Y_embed).bind(source="resid_post.10")
>>> inj.provenance["target"]
'embed'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.maps.base import AlignmentMap, _jsonable, register, registry
from xlens_align.maps.io import MapContentError
from xlens_align.maps.preprocess import rename_legacy_params
from xlens_align.stats import CrossStats

__all__ = ["EMBED", "EmbeddingInjection"]

EMBED = "embed"
_ALIASES = {"lowrank": "low_rank"}
_NOT_BASES = ("adapter", "embedding_injection")


@register("embedding_injection")
class EmbeddingInjection(AlignmentMap):
    """A map from A's `source` point to B's ``"embed"`` point, fitted like its `base` map.

    Args:
        base: a registered map kind (``"affine"``, ``"procrustes"``, ``"low_rank"``/``"lowrank"``,
            ``"cca"``, ``"mlp"``) or an `AlignmentMap` instance whose hyper-parameters are used
            (it is cloned, never fitted in place).
        base_params: hyper-parameters of the base kind when `base` is a string
            (e.g. ``{"alpha": "cv"}``).

    Fitted: ``base_map_`` (the fitted base map), ``d_in_``, ``d_out_``, ``n_samples_``.
    `fit`, `fit_stats` (closed-form bases), `transform`, `score`, `save`/`load` behave as the
    base map's; `bind` refuses any target but ``"embed"``.
    """

    def __init__(
        self, base: str | AlignmentMap = "affine", base_params: Mapping[str, Any] | None = None
    ) -> None:
        self.base = base
        self.base_params = base_params

    # -- the base map -------------------------------------------------------------------------
    def _base_kind(self) -> str:
        if isinstance(self.base, AlignmentMap):
            return self.base.kind
        if not isinstance(self.base, str):
            raise TypeError(
                f"base must be a map kind (str) or an AlignmentMap instance, got {type(self.base).__name__}"
            )
        kind = _ALIASES.get(self.base, self.base)
        if kind not in registry or kind in _NOT_BASES:
            valid = sorted(k for k in registry if k not in _NOT_BASES)
            raise ValueError(f"base must be one of {valid} or an AlignmentMap instance, got {self.base!r}")
        return kind

    def make_base(self) -> AlignmentMap:
        """A fresh, unfitted base map with the configured hyper-parameters."""
        if isinstance(self.base, AlignmentMap):
            if self.base_params:
                raise ValueError("base_params only applies when base is a kind name; configure the instance")
            if self.base.kind in _NOT_BASES:
                raise TypeError(f"base cannot be a {type(self.base).__name__}: it is not fitted from pairs")
            return type(self.base)(**self.base.get_params())
        kind = self._base_kind()
        params = dict(self.base_params or {})
        try:
            return registry[kind](**params)
        except TypeError as e:
            raise TypeError(f"base_params do not fit base {kind!r}: {e}") from None

    # -- provenance: the target is always B's embedding ---------------------------------------
    @property
    def provenance(self) -> dict[str, Any]:
        prov = super().provenance
        prov.setdefault("target", EMBED)
        return prov

    def bind(self, a: Any = None, b: Any = None, **info: Any) -> EmbeddingInjection:
        target = info.get("target", EMBED)
        if target != EMBED:
            raise ValueError(
                f"an EmbeddingInjection always targets B's {EMBED!r} point, got target={target!r}"
            )
        super().bind(a, b, **info)
        return self

    # -- fitting ------------------------------------------------------------------------------
    def fit_from(self, m: AlignmentMap) -> EmbeddingInjection:
        """Adopt `m`, an already fitted map of this injection's base kind (e.g. one that
        `fitting.fit_grid` solved from streamed statistics), as the base map; returns self."""
        if not isinstance(m, AlignmentMap) or not m.is_fitted:
            raise TypeError(f"fit_from needs a fitted AlignmentMap, got {m!r}")
        if m.kind != self._base_kind():
            raise ValueError(f"fit_from got a {m.kind!r} map; this injection's base is {self._base_kind()!r}")
        self._set_from(m)
        return self

    def _set_from(self, m: AlignmentMap) -> None:
        self.base_map_ = m
        self.d_in_, self.d_out_ = int(m.d_in_), int(m.d_out_)
        self.n_samples_ = int(getattr(m, "n_samples_", 0) or 0)

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        m = self.make_base()
        m.fit(X, Y)
        if not getattr(m, "n_samples_", 0):
            m.n_samples_ = int(X.shape[0])
        self._set_from(m)

    def fit_stats(self, stats: CrossStats, **kwargs: Any) -> EmbeddingInjection:
        """Fit a closed-form base from streamed statistics (``val_stats=`` for Affine cv)."""
        m = self.make_base()
        m.fit_stats(stats, **kwargs)
        self._set_from(m)
        return self

    # -- use ----------------------------------------------------------------------------------
    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        return self.base_map_._predict64(X).to(torch.float64)

    def to(self, device: torch.device | str) -> EmbeddingInjection:
        if self.is_fitted:
            self.base_map_.to(device)
        return self

    # -- persistence: the base map's state, prefixed ------------------------------------------
    def _params_json(self) -> dict[str, Any]:
        if isinstance(self.base, AlignmentMap):
            return {"base": self.base.kind, "base_params": self.base._params_json()}
        return {
            "base": self._base_kind(),
            "base_params": _jsonable(dict(self.base_params or {}), "base_params"),
        }

    @classmethod
    def _params_from_json(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        out = super()._params_from_json(params, tensors)
        if isinstance(out.get("base_params"), dict):
            out["base_params"] = rename_legacy_params(out["base_params"])
        return out

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        self._check_fitted()
        m = self.base_map_
        t, s = m._state()
        tensors = {f"base_map_.{k}": v for k, v in t.items()}
        scalars = {
            "base_map_": {"__map__": m.kind, "params": m._params_json(), "state": s},
            "d_in_": self.d_in_,
            "d_out_": self.d_out_,
            "n_samples_": self.n_samples_,
        }
        return tensors, scalars

    def _load_state(self, tensors: Mapping[str, Tensor], scalars: Mapping[str, Any]) -> None:
        info = scalars.get("base_map_")
        if not isinstance(info, dict) or "__map__" not in info:
            raise ValueError("embedding injection state lacks its base map")
        sub = {k[len("base_map_.") :]: v for k, v in tensors.items() if k.startswith("base_map_.")}
        extra = [k for k in tensors if not k.startswith("base_map_.")]
        if extra:
            raise ValueError(f"unexpected tensors in embedding injection state: {extra}")
        cls = registry.get(info["__map__"])
        if cls is None:
            raise ValueError(f"unknown base map kind {info['__map__']!r}")
        m = cls(**cls._params_from_json(info["params"], sub))
        try:
            m._load_state(sub, info["state"])
        except MapContentError as e:
            raise MapContentError(f"base_map_ (its tensors are named 'base_map_.<name>'): {e}") from None
        self.base_map_ = m
        for k, v in scalars.items():
            if k != "base_map_":
                setattr(self, k, v)
