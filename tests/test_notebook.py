"""notebooks/tour.ipynb runs cell by cell as written, and its numbers are the real ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_tour_notebook_runs():
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "tour.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    ns: dict = {}
    for i, src in enumerate(cells):
        exec(compile(src, f"tour.ipynb[code cell {i}]", "exec"), ns)
    # the map is scored on held-out rows, and its patch does something measurable in B
    score = ns["m"].score(ns["Xh"], ns["Yh"])
    assert 0.2 < score["r2"] <= 1.0
    eff = ns["eff"]
    assert eff.ce_clean < eff.ce_patched < eff.ce_ablated and 0.0 < eff.recovered < 1.0
    grid = ns["grid"]
    # default points: "embed" and every resid_post of each model
    for pts, model in ((grid.points_a, ns["a"]), (grid.points_b, ns["b"])):
        assert pts == ["embed", *(f"resid_post.{i}" for i in range(model.n_layers))]
    assert grid.values.shape == (ns["a"].n_layers + 1, ns["b"].n_layers + 1)
    assert all(math.isfinite(v) for v in grid.values.flatten().tolist())
    assert grid.figure().data[0].type == "heatmap"
