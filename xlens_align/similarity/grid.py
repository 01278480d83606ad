"""`Grid`: a similarity value for every (point of model A, point of model B) pair."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .views import VIEW_LABELS, check_view

__all__ = ["DISTANCE_MEASURES", "Grid"]

#: measures where lower means more similar (best_match takes the minimum)
DISTANCE_MEASURES = frozenset({"procrustes", "procrustes_distance"})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


@dataclass
class Grid:
    """Layer-by-layer similarity of two models.

    values: float64 [P_A, P_B]; ``values[i, j]`` compares ``points_a[i]`` with ``points_b[j]``
    (NaN = not computed). n_tokens: rows (tokens) the values are computed from. extra: JSON-able
    details (filters, row counts, measure options, p-values ...). view: what was compared
    (`similarity.views`): "raw" stream, "rms"-normalised rows or "standardized" dimensions.
    """

    values: Float[Tensor, "pa pb"]
    points_a: list[str]
    points_b: list[str]
    measure: str
    n_tokens: int
    model_a: str = "A"
    model_b: str = "B"
    extra: dict[str, Any] = field(default_factory=dict)
    view: str = "raw"

    def __post_init__(self) -> None:
        self.view = check_view(self.view)
        self.values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu()
        self.points_a = [str(p) for p in self.points_a]
        self.points_b = [str(p) for p in self.points_b]
        want = (len(self.points_a), len(self.points_b))
        if tuple(self.values.shape) != want:
            raise ValueError(
                f"values must have shape [len(points_a), len(points_b)] = {want}, got {tuple(self.values.shape)}"
            )
        self.n_tokens = int(self.n_tokens)

    @property
    def higher_is_better(self) -> bool:
        return self.measure not in DISTANCE_MEASURES

    def best_match(self) -> dict[str, tuple[str, float]]:
        """For each point of A: the most similar point of B and its value (NaNs ignored;
        points of A with no computed value are left out). Distances take the minimum."""
        out: dict[str, tuple[str, float]] = {}
        sign = 1.0 if self.higher_is_better else -1.0
        for i, pa in enumerate(self.points_a):
            row = self.values[i] * sign
            ok = ~torch.isnan(row)
            if not ok.any():
                continue
            j = int(torch.where(ok, row, torch.tensor(-math.inf, dtype=row.dtype)).argmax())
            out[pa] = (self.points_b[j], float(self.values[i, j]))
        return out

    # -- plots --------------------------------------------------------------------------------
    def figure(self, **layout: Any):
        """Plotly heatmap: rows = points of A (y), columns = points of B (x), values on hover."""
        import plotly.graph_objects as go

        z = [[None if math.isnan(v) else v for v in row] for row in self.values.tolist()]
        hover = f"{self.model_a}: %{{y}}<br>{self.model_b}: %{{x}}<br>{self.measure} = %{{z:.4f}}"
        # per-cell controls (layer_grid(..., n_perm=, n_boot=)) go on the hover text
        notes = [["" for _ in self.points_b] for _ in self.points_a]
        for key, fmt in (("p_values", "p = {:.3g}"), ("ci_low", "CI [{:.3f}, "), ("ci_high", "{:.3f}]")):
            for i, row in enumerate(self.extra.get(key) or []):
                for j, v in enumerate(row):
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        notes[i][j] += ("<br>" if key != "ci_high" else "") + fmt.format(v)
        extra_hover = any(any(row) for row in notes)
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=self.points_b,
                y=self.points_a,
                colorscale="Viridis",
                reversescale=not self.higher_is_better,
                colorbar={"title": {"text": self.measure}},
                customdata=notes if extra_hover else None,
                hovertemplate=hover + ("%{customdata}" if extra_hover else "") + "<extra></extra>",
            )
        )
        fig.update_layout(
            title=(
                f"{self.measure} on the {VIEW_LABELS[self.view]}: {self.model_a} vs {self.model_b} "
                f"(n_tokens = {self.n_tokens:,})"
            ),
            xaxis={"title": {"text": f"{self.model_b} point"}, "type": "category"},
            yaxis={"title": {"text": f"{self.model_a} point"}, "type": "category"},
            **layout,
        )
        return fig

    def save_html(self, path: str | Path) -> Path:
        """Write the heatmap as a self-contained HTML file (plotly.js embedded, works offline)."""
        path = Path(path)
        self.figure().write_html(str(path), include_plotlyjs=True)
        return path

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> str:
        """JSON text (NaN values as null); `Grid.from_json` restores it exactly."""
        return json.dumps(
            {
                "values": _jsonable(self.values),
                "points_a": self.points_a,
                "points_b": self.points_b,
                "measure": self.measure,
                "n_tokens": self.n_tokens,
                "model_a": self.model_a,
                "model_b": self.model_b,
                "extra": _jsonable(self.extra),
                "view": self.view,
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Grid:
        """The `Grid` whose `to_json` text is `text` (the text, not a path: ``Path(p).read_text()``)."""
        if not isinstance(text, str | bytes):
            raise TypeError(f"text must be a Grid's JSON text (str), got {type(text).__name__}")
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(
                f"text is not JSON ({e}); Grid.from_json takes the JSON text itself (for a file: "
                f"Grid.from_json(Path(path).read_text())), got {text[:60]!r}"
            ) from None
        if not isinstance(d, dict):
            raise ValueError(f"text is JSON but not a Grid's: a {type(d).__name__}, not an object")
        missing = [k for k in ("values", "points_a", "points_b", "measure", "n_tokens") if k not in d]
        if missing:
            raise ValueError(f"text is JSON but not a Grid's: it lacks {missing}")
        vals = [[math.nan if v is None else float(v) for v in row] for row in d["values"]]
        values = torch.tensor(vals, dtype=torch.float64).reshape(len(d["points_a"]), len(d["points_b"]))
        return cls(
            values=values,
            points_a=d["points_a"],
            points_b=d["points_b"],
            measure=d["measure"],
            n_tokens=d["n_tokens"],
            model_a=d.get("model_a", "A"),
            model_b=d.get("model_b", "B"),
            extra=d.get("extra", {}),
            view=d.get("view", "raw"),
        )
