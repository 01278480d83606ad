"""Bad input to texts, row filters, grids and the scale-invariant measures is answered clearly:
each error names the argument and what was expected (issue 11)."""

from __future__ import annotations

import warnings

import pytest
import torch

import xlens_align as xa
from xlens_align import similarity as S
from xlens_align.validate import check_texts

POINTS = (["embed", "resid_post.1"], ["embed", "resid_post.2"])
LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire all day."


def _rows(pair, texts, **kw) -> tuple[int, dict[str, int]]:
    """Aligned rows kept and the filter counts, summed over `collect`'s batches."""
    n, filtered = 0, {}
    for pb in xa.collect(pair, texts, *POINTS, progress=False, **kw):
        n += pb.n
        for k, v in pb.filtered.items():
            filtered[k] = filtered.get(k, 0) + v
    return n, filtered


# -- texts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["\ud800", "\udfff", "\udc80"])
def test_lone_surrogate_named_with_its_index_and_code_point(bad):
    texts = ["fine", f"abc{bad}def"]
    with pytest.raises(
        ValueError, match=rf"texts\[1\] holds a lone surrogate, U\+{ord(bad):04X}, at character 3"
    ):
        check_texts(texts)
    with pytest.raises(ValueError, match=rf"val_texts\[1\] holds a lone surrogate, U\+{ord(bad):04X}"):
        check_texts(texts, "val_texts")


def test_lone_surrogate_refused_before_the_tokenizer(tiny_pair):
    texts = ["a first text", "a second one", "broken \ud83d here"]
    with pytest.raises(ValueError, match=r"texts\[2\] holds a lone surrogate, U\+D83D, at character 7"):
        next(xa.collect(tiny_pair, texts, *POINTS, progress=False))
    with pytest.raises(ValueError, match=r"texts\[0\] holds a lone surrogate, U\+D83D"):
        tiny_pair.align(["broken \ud83d here"])
    # a valid pair of surrogates is one astral character: accepted
    assert check_texts(["emoji \U0001f600 ok"]) == ["emoji \U0001f600 ok"]


# -- everything filtered out ------------------------------------------------------------------------
def test_accumulate_says_which_filter_left_no_rows(tiny_pair):
    texts = ["hello world", "short"]
    total, _ = _rows(tiny_pair, texts)
    _, filtered = _rows(tiny_pair, texts, drop_first=100)
    assert total > 0 and filtered["drop_first"] == total
    msg = (
        rf"accumulate: no rows left from 2 text\(s\).*'drop_first': 100.*dropped all {total} aligned rows "
        rf"\(filtered: \{{'bos': 2, 'drop_first': {total}\}}\); drop_first=100 drops every chunk that starts "
        r"within the first 100 tokens"
    )
    with pytest.raises(ValueError, match=msg):
        xa.activations.accumulate(tiny_pair, texts, *POINTS, drop_first=100, progress=False)
    with pytest.raises(ValueError, match=r"collect_all: no rows left from 2 text\(s\).*drop_first=100"):
        xa.activations.collect_all(tiny_pair, texts, *POINTS, drop_first=100, progress=False)


def test_fitting_pipelines_say_no_rows_were_left(tiny_pair):
    with pytest.raises(ValueError, match=r"no rows left from 1 text\(s\).*drop_first=50 drops every chunk"):
        xa.fitting.fit_grid(
            tiny_pair, ["hello world"], "resid_post.1", "resid_post.2", "procrustes", drop_first=50
        )
    # training rows survive; the validation texts (too short for drop_first=3) do not
    with pytest.raises(
        ValueError, match=r"val_texts \(statistics that choose alpha\): .*no rows left from 1"
    ):
        xa.fitting.fit_grid(
            tiny_pair,
            [LONG, LONG[::-1]],
            "resid_post.1",
            "resid_post.2",
            alpha="cv",
            val_texts=["hi"],
            drop_first=3,
        )


def test_empty_stats_grid_says_it_holds_no_rows():
    grid = xa.stats.StatsGrid(["x"], ["y"]).update({"x": torch.zeros(0, 3)}, {"y": torch.zeros(0, 2)})
    with pytest.raises(ValueError, match=r"no statistics for pair \('x', 'y'\): the grid holds 0 rows"):
        grid["x", "y"]
    with pytest.raises(KeyError, match=r"pair \('x', 'q'\) is not among the grid's pairs \[\('x', 'y'\)\]"):
        grid["x", "q"]


# -- grids on too few rows --------------------------------------------------------------------------
@pytest.mark.parametrize(("measure", "need"), [("cka", 4), ("rsa", 3), ("cka_rbf", 4), ("cka_feature", 2)])
def test_grid_on_too_few_rows_says_how_many_it_has_and_needs(tiny_pair, measure, need):
    n, _ = _rows(tiny_pair, ["hi"])
    assert n < need
    with pytest.raises(ValueError, match=rf"a '{measure}' grid needs at least {need} aligned rows, got {n};"):
        S.layer_grid(tiny_pair, ["hi"], measure, *POINTS, progress=False)


def test_grid_emptied_by_drop_first_names_the_filter(tiny_pair):
    total, _ = _rows(tiny_pair, ["hello world"])
    msg = rf"needs at least 4 aligned rows, got 0 of {total} \(drop_first removed {total} chunks"
    with pytest.raises(ValueError, match=msg):
        S.layer_grid(tiny_pair, ["hello world"], "cka", *POINTS, drop_first=30, progress=False)


def test_grid_on_a_handful_of_rows_warns_naming_n(tiny_pair):
    text = "The quick brown fox jumps"
    n, _ = _rows(tiny_pair, [text])
    assert 4 <= n < S.MIN_GRID_ROWS
    with pytest.warns(S.SmallSampleWarning, match=rf"grid rests on n={n} rows; it needs at least 32") as rec:
        g = S.layer_grid(tiny_pair, [text], "cka", *POINTS, progress=False)
    assert g.n_tokens == n and "can be negative" in str(rec[0].message)
    assert issubclass(S.SmallSampleWarning, UserWarning)


def test_grid_on_enough_rows_does_not_warn(tiny_pair):
    texts = [LONG, LONG.upper(), LONG[::-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.SmallSampleWarning)
        g = S.layer_grid(tiny_pair, texts, "cka", *POINTS, progress=False, drop_first=1, massive=5.0)
    assert g.n_tokens >= S.MIN_GRID_ROWS


# -- scale invariance ----------------------------------------------------------------------------
def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 12, generator=g, dtype=torch.float64)
    Y = X[:, :8] @ torch.randn(8, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, 9, generator=g, dtype=torch.float64
    )
    return X, Y


SCALES = [10.0**k for k in range(-150, 151, 25)] + [1e-200, 1e200]
MEASURES = {
    "cka": S.cka,
    "cka_biased": lambda X, Y: S.cka(X, Y, debiased=False),
    "cka_rbf": lambda X, Y: S.cka(X, Y, kernel="rbf"),
    "cca": S.cca_corr,
    "svcca": S.svcca,
    "pwcca": S.pwcca,
    "procrustes": S.procrustes_distance,
    "mutual_knn": lambda X, Y: S.mutual_knn(X, Y, k=5),
    "rsa": lambda X, Y: S.rsa(X, Y, metric="euclidean"),
}


@pytest.mark.parametrize("name", list(MEASURES))
def test_scale_invariant_measures_ignore_the_scale(name):
    X, Y = _data()
    f = MEASURES[name]
    ref = f(X, Y)
    for c in SCALES:
        assert f(c * X, Y) == pytest.approx(ref, rel=1e-9, abs=1e-12), f"{name}(c X, Y), c={c:g}"
        assert f(X, c * Y) == pytest.approx(ref, rel=1e-9, abs=1e-12), f"{name}(X, c Y), c={c:g}"
        assert f(c * X, c * Y) == pytest.approx(ref, rel=1e-9, abs=1e-12), f"{name}(c X, c Y), c={c:g}"


def test_biased_cka_at_extreme_scales_matches_the_written_out_formula():
    X, Y = _data()
    xc, yc = X - X.mean(0), Y - Y.mean(0)
    ref = float((xc.T @ yc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert 0.3 < ref < 0.95
    for c in (1e-200, 1e-150, 1.0, 1e150, 1e200):
        assert S.cka(c * X, Y / c, debiased=False) == pytest.approx(ref, rel=1e-10)


def test_grid_measures_ignore_the_scale_too():
    X, Y = _data(n=80)
    batch = ({"x": 1e200 * X, "x_small": 1e-200 * X}, {"y": Y})
    for measure in ("cca", "procrustes", "rsa", "cka_rbf"):
        g = S.grid_from_batches([batch], measure)
        ref = S.measures.pure_function(measure, measure, {})[0](X, Y)
        assert g.values[:, 0].tolist() == pytest.approx([ref, ref], rel=1e-9), measure


def test_scaled_copy_is_exact_and_keeps_zero_and_empty_input():
    X, _ = _data()
    for c in (1e-300, 3.7e-200, 1.0, 2.5e200, 1e300):
        s = S._util.scaled64(c * X)
        assert 0.5 <= float(s.abs().max()) < 1.0
        assert torch.equal(S._util.scaled64(s), s)  # already in range: unchanged
    z = torch.zeros(3, 2)
    assert torch.equal(S._util.scaled64(z), z.double())
    assert S._util.scaled64(torch.zeros(0, 2)).shape == (0, 2)


def test_streamed_grids_ignore_the_scale():
    X, Y = _data(n=96)
    halves = [({"x": X[:48], "y": Y[:48]}, {"y": Y[:48]}), ({"x": X[48:], "y": Y[48:]}, {"y": Y[48:]})]
    for measure, kw in (("cka", {"minibatch_size": 48}), ("cka_feature", {})):
        ref = S.grid_from_batches(halves, measure, **kw).values
        for c in (1e-200, 1e200):
            big = [({"x": c * a["x"], "y": a["y"] / c}, b) for a, b in halves]
            assert S.grid_from_batches(big, measure, **kw).values.flatten().tolist() == pytest.approx(
                ref.flatten().tolist(), rel=1e-9
            ), (measure, c)
    # the streamed value is the pure function's: biased CKA from co-moments, minibatch CKA per half
    xc, yc = X - X.mean(0), Y - Y.mean(0)
    biased = float((xc.T @ yc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert S.grid_from_batches(halves, "cka_feature").values[0, 0] == pytest.approx(biased, rel=1e-10)
    for c in (1e-200, 1e200):  # the accumulator on its own: one fixed factor per point
        big = S.MinibatchCKA(minibatch_size=40).update(c * X, Y).update(c * X, Y).compute()[0, 0]
        ref = S.MinibatchCKA(minibatch_size=40).update(X, Y).update(X, Y).compute()[0, 0]
        assert float(big) == pytest.approx(float(ref), rel=1e-9) and 0.3 < float(ref) < 1.0


def test_kernels_rdm_and_neighbours_at_extreme_scales():
    X, _ = _data(n=30)
    for c in (1e-200, 1e200):
        assert torch.allclose(S.gram_rbf(c * X), S.gram_rbf(X), rtol=1e-9, atol=1e-12)
        assert torch.equal(S.knn_indices(c * X, k=4), S.knn_indices(X, k=4))
        assert torch.allclose(S.rdm(c * X), S.rdm(X), rtol=1e-9)
        assert torch.allclose(S.rdm(c * X, "euclidean") / c, S.rdm(X, "euclidean"), rtol=1e-9)
    assert torch.allclose(S.gram_linear(1e100 * X) / 1e200, S.gram_linear(X), rtol=1e-9)
    with pytest.raises(
        ValueError, match=r"gram_linear: X holds values up to [\d.]+e\+200; their products overflow"
    ):
        S.gram_linear(1e200 * X)


def test_statistics_refuse_values_whose_squares_leave_float64():
    X, Y = _data(n=10)
    for c, way in ((1e200, "overflow"), (1e-200, "underflow to 0")):
        with pytest.raises(
            ValueError, match=rf"X holds values whose largest \|value\| is .*: their squares {way}"
        ):
            xa.stats.CrossStats.from_data(c * X, Y)
        with pytest.raises(ValueError, match=rf"acts_b\['y'\] holds values .* squares {way}"):
            xa.stats.StatsGrid(["x"], ["y"]).update({"x": X}, {"y": c * Y})


def test_stats_grid_and_grids_check_their_point_lists():
    X, Y = _data(n=10)
    with pytest.raises(TypeError, match=r"points_a must be a list, got the single string 'resid_post.1'"):
        xa.stats.StatsGrid("resid_post.1", ["y"])
    with pytest.raises(ValueError, match=r"pairs must hold \(point of A, point of B\) tuples, got 'xyz'"):
        xa.stats.StatsGrid(["x"], ["y"], pairs=["xyz"])
    grid = xa.stats.StatsGrid(["x"], ["y"]).update({"x": X}, {"y": Y})
    with pytest.raises(ValueError, match=r"acts_a\['x'\] has 7 features, earlier updates had 12"):
        grid.update({"x": torch.randn(4, 7, dtype=torch.float64)}, {"y": Y[:4]})
    with pytest.raises(ValueError, match=r"points_b must name at least one point .* got \[\]"):
        S.grid_from_batches([({"x": X}, {"y": Y})], "cka", ["x"], [])
    with pytest.warns(S.SmallSampleWarning, match="n=10 rows"):
        g = S.grid_from_batches([({"resid_post.1": X}, {"y": Y})], "cka", "resid_post.1", "y")
    assert g.points_a == ["resid_post.1"] and g.points_b == ["y"]
    with pytest.raises(ValueError, match="no batches"):
        S.grid_from_batches([], "cka", ["x"], ["y"])
    with pytest.raises(ValueError, match=r"with minibatch_size=None every update is one minibatch"):
        S.grid_from_batches([({"x": X[:2]}, {"y": Y[:2]})], "cka", minibatch_size=None)
    with pytest.raises(ValueError, match=r"MinibatchCKA has 3 rows, no minibatch of the 4 or more rows"):
        S.MinibatchCKA(minibatch_size=8).update(X[:3], Y[:3]).compute()
    with pytest.raises(ValueError, match="keep must be a fraction of variance"):
        S.svcca(X, Y, keep=True)


def test_layer_grid_names_keywords_nobody_takes(tiny_pair):
    with pytest.raises(
        TypeError, match=r"layer_grid got unexpected keyword arguments \['max_token'\].*'max_length'"
    ):
        S.layer_grid(tiny_pair, ["hello world"], "cka", *POINTS, max_token=8)


def test_grid_from_json_says_what_it_takes(tmp_path):
    g = S.Grid(torch.eye(2), ["a0", "a1"], ["b0", "b1"], "cka", 10)
    path = tmp_path / "g.json"
    path.write_text(g.to_json())
    assert S.Grid.from_json(path.read_text()).values.tolist() == g.values.tolist()
    with pytest.raises(ValueError, match=r"text is not JSON .*takes the JSON text itself .*got '/"):
        S.Grid.from_json(str(path))
    with pytest.raises(
        ValueError, match=r"not a Grid's: it lacks \['points_a', 'points_b', 'measure', 'n_tokens'\]"
    ):
        S.Grid.from_json('{"values": []}')
    with pytest.raises(ValueError, match=r"not a Grid's: a list, not an object"):
        S.Grid.from_json("[1, 2]")
    with pytest.raises(TypeError, match=r"text must be a Grid's JSON text \(str\), got PosixPath"):
        S.Grid.from_json(path)


def test_numpy_numbers_count_as_numbers_and_bools_do_not():
    import numpy as np

    from xlens_align.validate import nonneg_int, positive_float

    assert nonneg_int(np.int64(2), "drop_first") == 2 and type(nonneg_int(np.int64(2), "drop_first")) is int
    assert positive_float(np.float32(0.5), "massive") == 0.5
    assert xa.RowFilter(drop_first=np.int32(3)).drop_first == 3
    for bad in (True, np.bool_(True), 1.5, np.float64("nan")):
        with pytest.raises(ValueError, match=r"drop_first must be an int >= 0, got"):
            xa.RowFilter(drop_first=bad)


def test_grid_batches_custom_measures_and_options_are_checked():
    X, Y = _data(n=40)
    two = [({"x": X[:20]}, {"y": Y[:20]}), ({"x": torch.randn(20, 5, dtype=torch.float64)}, {"y": Y[20:]})]
    for measure in ("cka", "cca", "cka_feature"):
        with pytest.raises(ValueError, match=r"batch\.a\['x'\] has 5 features, earlier batches had 12"):
            S.grid_from_batches(two, measure, minibatch_size=None)
    g = S.grid_from_batches([(X, Y)], "cka")  # plain tensors: one point per side, as MinibatchCKA takes
    assert g.points_a == ["a"] and float(g.values[0, 0]) == pytest.approx(S.cka(X, Y), abs=1e-9)
    with pytest.raises(TypeError, match=r"batch pair \(a, b\): b must be a dict point -> Tensor"):
        S.grid_from_batches([({"x": X}, Y)], "cka")
    with pytest.raises(TypeError, match=r"measure '<lambda>' must return a number, got 'high'"):
        S.grid_from_batches([(X, Y)], lambda a, b: "high")
    with pytest.raises(ValueError, match=r"measure '<lambda>' returned nan for a cell"):
        S.grid_from_batches([(X, Y)], lambda a, b: float("nan"))
    with pytest.raises(TypeError, match=r"debiased must be True or False, got 'no'"):
        S.cka(X, Y, debiased="no")
    with pytest.raises(TypeError, match=r"debiased must be True or False, got 1"):
        S.grid_from_batches([(X, Y)], "cka_rbf", measure_kw={"debiased": 1})
    with pytest.raises(TypeError, match=r"seed must be an int, got 'a'"):
        S.permutation_test(S.cka, X, Y, n_perm=5, seed="a")
    with pytest.raises(TypeError, match=r"seed must be an int, got 1.5"):
        S.grid_from_batches([(X, Y)], "cca", seed=1.5)
    acc = S.MinibatchCKA(points_a="resid_post.1", points_b=["y"])
    assert acc.points_a == ["resid_post.1"]
    with pytest.raises(ValueError, match=r"points_b must name at least one point"):
        S.MinibatchCKA(points_b=[])
