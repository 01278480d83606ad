"""A real layer grid: SmolLM2-135M vs Gemma 3 270M on the pydoc corpus, saved as HTML."""

from __future__ import annotations

import math

import pytest
import torch

import xlens_align as xa


@pytest.fixture(scope="module")
def real_batches(smollm2, gemma3):
    pair = xa.ModelPair(smollm2, gemma3)
    texts = [t[:300] for t in xa.corpus.load("pydoc").train[:8]]
    pts_a = ["embed", *(f"resid_post.{i}" for i in range(smollm2.n_layers)), "final"]
    pts_b = ["embed", *(f"resid_post.{i}" for i in range(gemma3.n_layers)), "final"]
    batches = list(xa.collect(pair, texts, pts_a, pts_b, batch_size=4, drop_first=1, progress=False))
    return pair, pts_a, pts_b, batches


@pytest.mark.slow
def test_real_cka_grid_saved_with_best_matches(real_batches, tmp_path):
    pair, pts_a, pts_b, batches = real_batches
    grids = {}
    for label, massive in (("filtered", 5.0), ("unfiltered", None)):
        g = xa.similarity.grid_from_batches(
            batches, "cka", pts_a, pts_b, massive=massive, model_a=pair.a.name, model_b=pair.b.name
        )
        assert g.values.shape == (len(pts_a), len(pts_b))
        assert torch.isfinite(g.values).all()
        assert float(g.values.min()) > -0.1 and float(g.values.max()) <= 1.0 + 1e-9
        path = tmp_path / f"cka_{label}.html"
        g.save_html(path)
        html = path.read_text()
        assert "resid_post.29" in html and "resid_post.17" in html and "plotly" in html.lower()
        grids[label] = g
    assert grids["filtered"].extra["filtered"]["massive"] > 0  # massive-activation tokens exist
    assert (
        grids["filtered"].extra["rows"]["massive"] == 5.0
        and grids["unfiltered"].extra["rows"]["massive"] is None
    )
    # collect's own counts (bos, drop_first=1) come through both grids; only the grid's massive differs
    by_collect = {k: v for k, v in grids["filtered"].extra["filtered"].items() if k != "massive"}
    assert by_collect == grids["unfiltered"].extra["filtered"] and by_collect["drop_first"] > 0
    best = grids["filtered"].best_match()
    assert set(best) == set(pts_a)  # reported for every point of A
    # measured on these texts: embed<->embed ~0.8; A's last layers match B's last third / final
    assert best["embed"][0] == "embed" and best["embed"][1] > 0.5
    last_third = {f"resid_post.{i}" for i in range(12, 18)} | {"final"}
    assert best["final"][0] in last_third and best["resid_post.29"][0] in last_third


@pytest.mark.slow
def test_model_against_itself_is_one_on_the_diagonal(real_batches):
    pair, pts_a, _, batches = real_batches
    own = [type(pb)(a=pb.a, b=pb.a, meta=pb.meta, batch=pb.batch) for pb in batches]
    pts = pts_a[::6]
    g = xa.similarity.grid_from_batches(own, "cka", pts, pts)
    for i in range(len(pts)):
        assert math.isclose(float(g.values[i, i]), 1.0, abs_tol=1e-9)
    assert float(g.values.max()) <= 1.0 + 1e-9
