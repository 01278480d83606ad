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


def _run(name: str) -> dict:
    """Execute notebooks/<name>.ipynb's code cells in order, as written; return the namespace."""
    import warnings

    nb = json.loads((Path(__file__).parents[1] / "notebooks" / f"{name}.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5 and all(c["outputs"] == [] for c in nb["cells"] if c["cell_type"] == "code")
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random models: small samples, near-zero loss gaps
        for i, src in enumerate(cells):
            exec(compile(src, f"{name}.ipynb[code cell {i}]", "exec"), ns)
    assert ns["TINY"] is True  # the suite runs the tiny models, as the notebooks are written
    return ns


def test_quickstart_notebook_runs():
    ns = _run("quickstart")
    X, Y, Xh = ns["X"], ns["Y"], ns["Xh"]
    assert X.shape[0] == Y.shape[0] == ns["fit_rows"].n > 100 and Xh.shape[0] == ns["held_rows"].n > 0
    scores = ns["scores"]
    assert scores["affine"]["r2"] > scores["fit on shuffled pairs"]["r2"]  # the pairing carries the fit
    eff = ns["eff"]
    assert eff.n_tokens > 0 and all(
        math.isfinite(v) for v in (eff.ce_clean, eff.ce_patched, eff.ce_ablated, eff.kl)
    )
    html = ns["page"].read_text()
    assert '<section id="effects">' in html and '<section id="maps">' in html
    assert f'<td class="num">{eff.kl:.4g}</td>' in html


def test_similarity_notebook_runs():
    ns = _run("similarity")
    grid, filtered, a, b = ns["grid"], ns["filtered"], ns["a"], ns["b"]
    assert grid.values.shape == (a.n_layers + 1, b.n_layers + 1)
    assert all(math.isfinite(v) for v in grid.values.flatten().tolist())
    assert list(grid.best_match()) == grid.points_a and grid.figure().data[0].type == "heatmap"
    assert filtered.n_tokens <= grid.n_tokens
    X, Y, perm = ns["X"], ns["Y"], ns["perm"]
    from xlens_align.similarity import cka
    from xlens_align.similarity.views import VIEW_LABELS

    assert abs(cka(X, Y[perm])) < 0.02 < cka(X, Y)  # shuffled pairs: debiased CKA near 0
    assert ns["p"] == 0.02  # no shuffle of 49 reaches the real value: p = 1 / 50
    p_values = ns["controlled"].extra["p_values"]
    assert len(p_values) == 2 and all(len(r) == 2 and all(0 < v <= 1 for v in r) for r in p_values)
    for v, g in ns["views"].items():  # each view's grid says which it is, in its title too
        assert (
            g.view == v
            and g.values.shape == grid.values.shape
            and VIEW_LABELS[v] in g.figure().layout.title.text
        )


def test_patching_notebook_runs():
    import torch

    ns = _run("patching")
    assert torch.equal(ns["same"], ns["clean"])  # writing B's own values back changes nothing
    assert ns["kl_last"] > 0 and len(ns["positions"][1]) > 0
    eff, pg = ns["eff"], ns["pg"]
    cell = pg.effects[ns["src"], ns["tgt"]]  # the grid's cell equals measure's number
    for k in ("ce_clean", "ce_patched", "ce_ablated", "kl", "top1_agreement"):
        assert math.isclose(getattr(cell, k), getattr(eff, k), rel_tol=1e-9, abs_tol=1e-12)
    assert pg.recovered.shape == (3, 3) and len(ns["maps"]) == 9
    assert {"clean", "patched", "ablated"} <= set(ns["gen"]) and ns["gen"]["clean"]
