"""The HTML report: built from a real run of the library on tiny models and from hand-written
results; every number drawn is the one results.json holds."""

from __future__ import annotations

import json
import math
import os
import warnings
from html import escape
from pathlib import Path

import pytest

from xlens_align import report
from xlens_align.report import results as R

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Paris is the capital of France, Berlin of Germany and Rome of Italy.",
    "Residual streams carry the model's state from one layer to the next one.",
    "Tokenizers cut the same text differently: 12345 apples, 678 pears!",
    "A map fit on paired rows is checked by the loss it recovers in the other model.",
    "Massive activations sit on the first tokens and dominate linear measures.",
]
HELD = [
    "Some held out text about the capital of Spain and the rivers of Europe.",
    "Another held out sentence, written for the evaluation of the mapped patch.",
]


def _figure(html: str, div_id: str) -> list[dict]:
    """The data list of the plotly figure drawn into `div_id`, parsed back from the page."""
    start = html.index(f'Plotly.newPlot(                        "{div_id}",')
    start = html.index("[", start)
    data, _ = json.JSONDecoder().raw_decode(html[start:])
    return data


def _close(a, b) -> bool:
    return (a is None and (b is None or math.isnan(b))) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


@pytest.fixture(scope="module")
def run(tiny_pair):
    """results.json of a small run: CKA grids (filtered and not), a functional grid, effects at
    two depths of B with the embedding-injection baseline, a generation, the maps' scores."""
    import xlens_align as xa

    pair = tiny_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random models: small samples, inverted ablations
        grids = [
            (xa.similarity.layer_grid(pair, TEXTS, "cka", progress=False, massive=m), m is not None)
            for m in (None, 5.0)
        ]
        src, tgts = "resid_post.1", ["resid_pre.2", "resid_post.3"]
        pg = xa.effects.grid(
            pair, xa.maps.Affine, HELD, sources=["resid_post.0", src], targets=tgts,
            fit_texts=TEXTS, ablation_texts=TEXTS,
        )  # fmt: skip
        rows = xa.activations.collect_all(pair, TEXTS, [src], [*tgts, "embed"], progress=False)
        X = rows.a[src]
        maps, effects = [], []
        for t in tgts:
            m = xa.maps.Procrustes().fit(X, rows.b[t]).bind(a=pair.a, b=pair.b, source=src, target=t)
            effects.append(
                xa.effects.measure(pair, m, source=src, target=t, texts=HELD, ablation_texts=TEXTS)
            )
            maps.append(
                {"map_kind": "procrustes", "source": src, "target": t, "score": m.score(X, rows.b[t])}
            )
        inj = xa.maps.EmbeddingInjection(base_params={"alpha": 1.0}).fit(X, rows.b["embed"])
        inj.bind(a=pair.a, b=pair.b, source=src, target="embed")
        effects.append(
            xa.effects.measure(pair, inj, source=src, target="embed", texts=HELD, ablation_texts=TEXTS)
        )
        gen = xa.generate(pair, m, "The capital of France is", source=src, target=tgts[-1], max_new_tokens=4)
    res = {
        "schema": 1,
        "command": "demo",
        "settings": {
            "a": {"source": pair.a.name, "family": pair.a.family, "n_layers": pair.a.n_layers},
            "b": {"source": pair.b.name, "family": pair.b.family, "n_layers": pair.b.n_layers},
            "corpus": {"name": "inline", "n_texts_fit": len(TEXTS), "n_texts_eval": len(HELD)},
            "seed": 0,
            "wall_s": 1.5,
        },
        "coverage": {k: float(v) for k, v in pair.align(TEXTS).coverage().items()},
        "similarity": [R.similarity_entry(g, filtered=f) for g, f in grids],
        "functional": R.functional_entry(pg),
        "effects": [R.effect_row(e, pair) for e in [*pg.effects.values(), *effects]],
        "generations": [R.generation_row(gen, "procrustes")],
        "maps": maps,
    }
    return json.loads(R.dumps(res)), grids, pg


def test_report_of_a_tiny_run_shows_every_section_with_the_results_numbers(run):
    from plotly.offline import get_plotlyjs

    res, grids, pg = run
    html = report.build(res)
    assert html.count(get_plotlyjs()) == 1 and "<script src=" not in html  # embedded once, offline
    for anchor in ("settings", "coverage", "similarity", "functional", "effects", "generations", "maps"):
        assert f'<section id="{anchor}">' in html and f'href="#{anchor}"' in html
    assert '<section id="adapter">' not in html and '<section id="checks">' not in html  # not computed
    # heatmaps: the grid's own figure, with the values of results.json (NaN as a gap)
    for i, (g, _) in enumerate(grids):
        (trace,) = _figure(html, f"similarity-{i}")
        assert trace["type"] == "heatmap" and trace["y"] == g.points_a and trace["x"] == g.points_b
        assert all(
            _close(z, v)
            for zr, vr in zip(trace["z"], g.values.tolist(), strict=True)
            for z, v in zip(zr, vr, strict=True)
        )
        for pa, (pb, v) in g.best_match().items():  # best match table
            assert f'<td>{pa}</td><td>{pb}</td><td class="num">{v:.4g}</td>' in html
    assert "filtered rows (row filters applied)" in html and "all rows (no row filter)" in html
    for key, mat in (("recovered", pg.recovered), ("kl", pg.kl), ("top1_agreement", pg.top1)):
        (trace,) = _figure(html, f"functional-0-{key}")  # one grid (an object): grid 0
        assert trace["z"] == mat.tolist() and trace["y"] == pg.sources and trace["x"] == pg.targets
        assert trace["reversescale"] is (key == "kl")  # lower KL is better
    # one grid per map kind (a list): each drawn with its own title
    two = report.build({**res, "functional": [res["functional"], {**res["functional"], "map_kind": "procrustes"}]})
    assert "functional-1-kl" in two and "recovered: procrustes maps" in two and "functional-2-" not in two
    # depth plots: one affine line (grid cells: 2 sources at the same depths -> split by source),
    # one procrustes line, and the injection baseline as a flat dashed line
    traces = _figure(html, "effects-depth")
    names = sorted({t["name"] for t in traces})
    assert names == ["affine from resid_post.0", "affine from resid_post.1", "injection", "procrustes"]
    proc = [t for t in traces if t["name"] == "procrustes"]
    rows = [r for r in res["effects"] if r["map_kind"] == "procrustes"]
    assert len(proc) == 3 and proc[0]["x"] == [r["depth_b"] for r in rows] == [0.5, 1.0]
    assert [t["y"] for t in proc] == [[r[k] for r in rows] for k in ("recovered", "kl", "top1_agreement")]
    inj = [t for t in traces if t["name"] == "injection"]
    (irow,) = [r for r in res["effects"] if r["target"] == "embed"]
    assert inj[1]["line"]["dash"] == "dash" and inj[1]["x"] == [0.5, 1.0] and inj[1]["y"] == [irow["kl"]] * 2
    gen = res["generations"][0]
    assert all(f"<pre>{escape(gen[k])}</pre>" in html for k in ("prompt", "clean", "patched", "ablated"))
    for m in res["maps"]:  # maps table: the held-out scores as results.json has them
        assert f'<td class="num">{m["score"]["r2"]:.4g}</td>' in html


def test_write_reads_results_json_and_writes_report_html(run, tmp_path):
    res, _, _ = run
    (tmp_path / "results.json").write_text(json.dumps(res))
    out = report.write(tmp_path)
    assert out == tmp_path / "report.html" and out.read_text(encoding="utf-8") == report.build(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]


def test_results_numbers_survive_json_nan_and_inf():
    # standard JSON out (NaN -> null, inf -> "inf"); the report reads them back as NaN / inf
    entry = {"measure": "cka", "view": "raw", "filtered": False, "points_a": ["embed", "resid_post.0"]}
    entry |= {"points_b": ["embed"], "values": [[float("nan")], [float("inf")]], "n_rows": 3}
    text = R.dumps({"schema": 1, "similarity": [entry]})
    assert '"values": [\n    [\n     null\n    ],\n    [\n     "inf"\n    ]' in text
    checked = report.check(json.loads(text))["similarity"][0]["values"]
    assert math.isnan(checked[0][0]) and checked[1][0] == math.inf


def test_relative_depth_closed_forms():
    assert [R.relative_depth(p, 4) for p in ("embed", "resid_pre.0", "resid_mid.1", "resid_post.1")] == [
        0.0,
        0.0,
        0.375,
        0.5,
    ]
    assert R.relative_depth("resid_post.-1", 4) == R.relative_depth("final", 4) == 1.0


def _entry(view: str, filtered: bool, **kw) -> dict:
    e = {"measure": "cka", "view": view, "filtered": filtered, "points_a": ["embed", "resid_post.0"]}
    return e | {"points_b": ["embed", "resid_post.0"], "values": [[0.9, 0.1], [0.2, 0.8]], "n_rows": 50} | kw


def test_minimal_results_draw_only_their_sections():
    html = report.build({"schema": 1, "settings": {"a": {"source": "x"}, "seed": 3}})
    assert '<section id="settings">' in html and "plotly-graph-div" not in html
    for anchor in ("coverage", "similarity", "functional", "effects", "adapter", "generations", "maps"):
        assert f'id="{anchor}"' not in html and f'href="#{anchor}"' not in html


def test_views_are_grouped_and_named():
    sims = [_entry("standardized", True), _entry("raw", False), _entry("rms", True), _entry("raw", True)]
    sims[1]["best_match"] = {
        "embed": ["embed", 0.9],
        "resid_post.0": {"point_b": "resid_post.0", "value": 0.8},
    }
    html = report.build({"schema": 1, "similarity": sims})
    heads = [
        "raw stream, filtered",
        "raw stream, all rows",
        "RMS-normalised, filtered",
        "standardised, filtered",
    ]
    at = [html.index(f"<h3>{h}") for h in heads]
    assert at == sorted(at)  # raw first, filtered before unfiltered
    assert "massive dimensions" in html and "next layer" in html and "weighs the same" in html
    assert html.count("Best match in B") == 1 and '<td class="num">0.8</td>' in html
    assert {f"similarity-{i}" for i in range(4)} <= {s.split('"')[0] for s in html.split('id="')[1:]}


def test_adapter_and_checks_tables():
    row = {"source": "resid_post.1", "target": "resid_pre.2", "map_kind": "adapter", "objective": "kl"}
    row |= {"recovered": 0.75, "kl": 0.125, "top1_agreement": 0.5}
    html = report.build({"schema": 1, "adapter": [row], "checks": {"forward": {"A": {"logits_diff": 0.0}}}})
    assert "<th>objective</th>" in html and "<td>kl</td>" in html and '<td class="num">0.125</td>' in html
    assert "<td>forward.A.logits_diff</td>" in html


def test_generations_are_html_escaped():
    gen = {"prompt": "<script>alert(1)</script>", "map_kind": "affine", "source": "s", "target": "t"}
    gen |= {"clean": "a & b", "patched": "</td></tr>", "ablated": '"q"'}
    html = report.build({"schema": 1, "generations": [gen]})
    assert "<script>alert(1)" not in html and "<pre>&lt;script&gt;alert(1)&lt;/script&gt;</pre>" in html
    assert "<pre>a &amp; b</pre>" in html and "<pre>&lt;/td&gt;&lt;/tr&gt;</pre>" in html
    assert "<pre>&quot;q&quot;</pre>" in html


def test_effect_intervals_become_error_bars():
    rows = [
        {"source": "s", "target": f"resid_post.{i}", "map_kind": "affine", "depth_a": 0.5, "depth_b": d}
        | {"recovered": r, "kl": 0.5, "top1_agreement": 0.25, "recovered_ci": [r - 0.125, r + 0.25]}
        for i, (d, r) in enumerate(((0.25, 0.5), (0.75, 0.625)))
    ]
    html = report.build({"schema": 1, "effects": rows})
    rec = _figure(html, "effects-depth")[0]
    assert rec["error_y"]["array"] == [0.25, 0.25] and rec["error_y"]["arrayminus"] == [0.125, 0.125]
    assert "CI [0.3750, 0.7500]" in rec["text"][0]


MALFORMED = [
    ([], "results must be a JSON object"),
    ({"schema": 2}, r"results\['schema'\] must be 1"),
    ({"schema": 1}, "no section to report"),
    ({"schema": 1, "similarity": {}}, "similarity must be a JSON list"),
    ({"schema": 1, "similarity": [_entry("raw", False, values=[[0.1, 0.2]])]}, r"similarity\[0\]\['values'\] must have 2 rows"),
    ({"schema": 1, "similarity": [_entry("raw", False, values=[[0.1], [0.2]])]}, r"\['values'\]\[0\] must have 2 values"),
    ({"schema": 1, "similarity": [_entry("normed", False)]}, r"similarity\[0\]\['view'\] must be one of"),
    ({"schema": 1, "similarity": [_entry("raw", "yes")]}, r"\['filtered'\] must be true or false"),
    ({"schema": 1, "similarity": [_entry("raw", True, values=[[0.1, "x"], [0, 1]])]}, r"\['values'\]\[0\]\[1\] must be a number"),
    ({"schema": 1, "similarity": [_entry("raw", True, n_rows=-1)]}, r"\['n_rows'\] must be an int >= 0"),
    ({"schema": 1, "functional": {"map_kind": "affine", "points_a": ["a"], "points_b": ["b"], "recovered": [[1]]}}, r"functional lacks 'kl'"),
    ({"schema": 1, "functional": [{"map_kind": "affine", "points_a": ["a"], "points_b": ["b"], "recovered": [[1]]}]}, r"functional\[0\] lacks 'kl'"),
    ({"schema": 1, "functional": "affine"}, r"functional must be a JSON list"),
    ({"schema": 1, "effects": [{"source": "s", "target": "t", "map_kind": "m", "recovered": 1, "kl": 0, "top1_agreement": 1}]}, r"effects\[0\] lacks 'depth_a'"),
    ({"schema": 1, "adapter": [{"source": "s", "target": "t", "map_kind": "m", "recovered": 1, "kl": 0, "top1_agreement": 1, "kl_ci": [0]}]}, r"adapter\[0\]\['kl_ci'\] must be \[low, high\]"),
    ({"schema": 1, "generations": [{"prompt": "p"}]}, r"generations\[0\] lacks 'map_kind'"),
    ({"schema": 1, "maps": [{"map_kind": "affine", "source": "s", "target": 3}]}, r"maps\[0\]\['target'\] must be a string"),
    ({"schema": 1, "coverage": [1, 2]}, "coverage must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("results", "match"), MALFORMED)
def test_malformed_results_name_the_section_and_key(results, match):
    with pytest.raises(ValueError, match=match):
        report.build(results)


def test_write_names_a_missing_or_malformed_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "results.json")):
        report.write(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": 1, "settings": ')
    with pytest.raises(ValueError, match=r"results\.json is not valid JSON"):
        report.write(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": 1, "effects": [{}]}')
    with pytest.raises(ValueError, match=r"results\.json: effects\[0\] lacks 'source'"):
        report.write(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_a_failed_write_leaves_no_report(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text(json.dumps({"schema": 1, "settings": {"seed": 0}}))

    def half_then_fail(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        report.write(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # neither report.html nor a temporary
    monkeypatch.undo()
    (tmp_path / "report.html").write_text("older report")
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        report.write(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "report.html").read_text() == "older report"  # the old one is untouched
