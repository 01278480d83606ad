"""Where each residual point lives in a raw Hugging Face model, per architecture.

A remote model is the raw HF module tree (no TransformerBridge), so every point name of
`points.py` is mapped onto a module path and a side (its input or its output):

============  =========================================================  ==================
point         llama / mistral / qwen2                                     gemma3
============  =========================================================  ==================
embed         ``model.embed_tokens`` output                               same (already
                                                                          scaled by sqrt(d))
resid_pre.L   ``model.layers.L`` input                                    same
resid_mid.L   ``model.layers.L.post_attention_layernorm`` input           ``model.layers.L.
                                                                          pre_feedforward_
                                                                          layernorm`` input
resid_post.L  ``model.layers.L`` output                                   same
final         ``model.norm`` output                                       same
============  =========================================================  ==================

Gemma 3 normalizes the attention output (``post_attention_layernorm``) *before* adding it to
the stream, so its stream between attention and MLP enters ``pre_feedforward_layernorm``.
These equal the bridge's hooks (`tests/test_remote.py` checks all four families against
`LensModel`), and so do writes. A write at ``resid_pre`` is made in place: the decoder layer keeps
its input as the residual, so the write reaches both branches, as the bridge's does. The bridge's
``hook_resid_mid`` is the input hook of the second norm (``ln2.hook_in``): a write there reaches
the MLP branch only and the residual keeps its clean value. A remote write at ``resid_mid``
does the same (it replaces the norm's input), so local and remote patches give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..points import Point

__all__ = ["MODULE_PATHS", "Site", "site", "sites_in_order"]

# family -> kind -> (module path template, "input" | "output")
MODULE_PATHS: dict[str, dict[str, tuple[str, str]]] = {}
_LLAMA_LIKE = {
    "embed": ("model.embed_tokens", "output"),
    "resid_pre": ("model.layers.{layer}", "input"),
    "resid_mid": ("model.layers.{layer}.post_attention_layernorm", "input"),
    "resid_post": ("model.layers.{layer}", "output"),
    "final": ("model.norm", "output"),
}
for _family in ("llama", "mistral", "qwen2"):
    MODULE_PATHS[_family] = dict(_LLAMA_LIKE)
MODULE_PATHS["gemma3"] = {
    **_LLAMA_LIKE,
    "resid_mid": ("model.layers.{layer}.pre_feedforward_layernorm", "input"),
}

# forward order of the sites inside one decoder layer: its input, the mid norm's input, its output
_ORDER = {"embed": 0, "resid_pre": 1, "resid_mid": 2, "resid_post": 3, "final": 4}


@dataclass(frozen=True)
class Site:
    """One residual point as a module path and a side: ``model.layers.3`` / ``output``."""

    point: Point
    path: str
    side: str

    @property
    def in_place(self) -> bool:
        """Whether a write changes the tensor itself (False: only the module's input is replaced)."""
        return self.point.kind != "resid_mid"

    def order(self, n_layers: int) -> tuple[int, int]:
        """Sort key in forward order (an envoy must be read in the order its module runs)."""
        layer = (
            -1 if self.point.kind == "embed" else n_layers if self.point.kind == "final" else self.point.layer
        )
        return layer, _ORDER[self.point.kind]


def site(family: str, point: Point) -> Site:
    """The module path and side of `point` (a resolved `Point`) in a model of `family`."""
    if family not in MODULE_PATHS:
        raise ValueError(f"family must be one of {sorted(MODULE_PATHS)} for a remote model, got {family!r}")
    path, side = MODULE_PATHS[family][point.kind]
    return Site(point, path.format(layer=point.layer), side)


def sites_in_order(family: str, points: list[Point], n_layers: int) -> list[Site]:
    """The distinct sites of `points`, in the order the forward pass reaches them."""
    unique = list(dict.fromkeys(points))
    return sorted((site(family, p) for p in unique), key=lambda s: s.order(n_layers))
