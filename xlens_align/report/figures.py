"""The report's figures, drawn from results.json's numbers only.

Heatmaps (similarity and the functional grid) are the library's one heatmap, `similarity.Grid.
figure`, on a `Grid` rebuilt from the JSON; the depth plots draw recovered / KL / top-1 against
B's relative depth, one line per map kind, the embedding-injection baseline dashed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..similarity import Grid
from .page import text

__all__ = ["DEPTH_METRICS", "depth_figure", "heatmap"]

#: (effect row key, CI key, axis title, lower is better)
DEPTH_METRICS = (
    ("recovered", "recovered_ci", "recovered fraction", False),
    ("kl", "kl_ci", "KL(clean || patched)", True),
    ("top1_agreement", "top1_ci", "top-1 agreement", False),
)
INJECTION = "injection"


def heatmap(
    values: Sequence[Sequence[float]],
    points_a: Sequence[str],
    points_b: Sequence[str],
    *,
    measure: str,
    title: str,
    n_rows: int = 0,
    model_a: str = "A",
    model_b: str = "B",
    extra: Mapping[str, Any] | None = None,
    view: str = "raw",
    lower_is_better: bool = False,
):
    """`Grid.figure()` of the given matrix (controls in `extra`: p_values / ci_low / ci_high)."""
    grid = Grid(
        values=torch.tensor(values, dtype=torch.float64),
        points_a=list(points_a),
        points_b=list(points_b),
        measure=measure,
        n_tokens=n_rows,
        model_a=model_a,
        model_b=model_b,
        extra={k: v for k, v in (extra or {}).items() if v is not None},
        view=view,
    )
    fig = grid.figure(height=max(360, 40 * len(points_a) + 160))
    if lower_is_better and grid.higher_is_better:  # e.g. KL: dark = bad, like the distances
        fig.update_traces(reversescale=True)
    fig.update_layout(title={"text": title})
    return fig


def _lines(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Effect rows grouped into lines: one per map kind, split by source when a kind has two rows
    at the same depth of B; the injection baseline (target "embed") is its own line."""
    by_kind: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[INJECTION if r["target"] == "embed" else r["map_kind"]].append(r)
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for kind, rs in by_kind.items():
        xs = [r["depth_b"] for r in rs]
        if kind != INJECTION and len(set(xs)) < len(xs):
            for r in rs:
                lines.setdefault(f"{kind} from {r['source']}", []).append(r)
        else:
            lines[kind] = rs
    return lines


def depth_figure(rows: Sequence[Mapping[str, Any]], model_b: str = "B"):
    """Recovered / KL / top-1 against the relative depth of B's target (x = depth_b), three panels.

    The injection baseline writes B's embeddings (depth 0), so its rows are placed at the depth of
    A's source (depth_a); a single injection row is drawn as a dashed horizontal line."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(DEPTH_METRICS), subplot_titles=[m[2] for m in DEPTH_METRICS])
    lines = _lines(rows)
    span = [r["depth_b"] for r in rows if r["target"] != "embed"] or [0.0, 1.0]
    lo, hi = min(span), max(span)
    for k, (name, rs) in enumerate(lines.items()):
        inj = name == INJECTION
        flat = inj and len(rs) == 1  # one baseline value: a horizontal line over the targets' span
        x_key = "depth_a" if inj else "depth_b"
        rs = [rs[0], rs[0]] if flat else sorted(rs, key=lambda r: r[x_key])
        xs = [lo, hi] if flat else [r[x_key] for r in rs]
        color = "#444" if inj else qualitative.Plotly[k % len(qualitative.Plotly)]
        label = "embedding injection (x: depth of A's source)" if inj and not flat else name
        for col, (key, ci_key, title, _) in enumerate(DEPTH_METRICS, start=1):
            ys = [r[key] for r in rs]
            cis = [r.get(ci_key) or [math.nan, math.nan] for r in rs]
            hover = [
                f"{text(r['source'])} → {text(r['target'])}<br>{title} = {y:.4f}"
                + ("" if math.isnan(c[0]) else f"<br>CI [{c[0]:.4f}, {c[1]:.4f}]")
                for r, y, c in zip(rs, ys, cis, strict=True)
            ]
            bars = None
            if not flat and any(not math.isnan(c[0]) for c in cis):
                bars = {
                    "type": "data",
                    "symmetric": False,
                    "array": [c[1] - y for c, y in zip(cis, ys, strict=True)],
                    "arrayminus": [y - c[0] for c, y in zip(cis, ys, strict=True)],
                }
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines" if flat else "lines+markers",
                    name=label,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": color, "dash": "dash" if inj else "solid"},
                    text=hover,
                    hovertemplate="%{text}<extra>" + text(label) + "</extra>",
                    error_y=bars,
                ),
                row=1,
                col=col,
            )
            fig.update_xaxes(title_text=f"relative depth of {text(model_b)}'s target", row=1, col=col)
    fig.update_layout(height=420, legend={"orientation": "h", "y": -0.25})
    return fig
