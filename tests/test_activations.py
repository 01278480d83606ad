"""collect: paired rows equal a direct HF forward at the aligned positions; filters; errors."""

from __future__ import annotations

import pytest
import torch

import xlens_align as xa
from xlens_align.stats import CrossStats, StatsGrid

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "def f(x):\n    return {'a': x ** 2}  # 数字 🙂 café",
    "In 1969, 3.14159 people landed on the Moon; ¡olé!",
    "Short.",
    "Whitespace   runs\t\tand\n\nnewlines  between   words.",
]


@pytest.fixture(scope="module")
def refs():
    """Independent HF copies of the tiny pair's models (same seeds, same configs)."""
    a, _ = xa.testing.tiny_hf("llama", n_layers=4, seed=0)
    b, _ = xa.testing.tiny_hf("mistral", n_layers=4, seed=1)
    return a, b


def test_collect_rows_match_direct_hf_forward(tiny_pair, refs):
    ref_a, ref_b = refs
    pts_a, pts_b = ["embed", "resid_post.1", "final"], ["resid_pre.2", "resid_mid.3"]
    batches = list(xa.collect(tiny_pair, TEXTS, pts_a, pts_b, batch_size=2, progress=False))
    assert len(batches) == 3
    n_total = 0
    for k, pb in enumerate(batches):
        ab = pb.batch
        with torch.no_grad():
            ha = ref_a(
                **{k_: v for k_, v in ab.model_inputs("a").items()}, output_hidden_states=True
            ).hidden_states
            hb = ref_b(
                **{k_: v for k_, v in ab.model_inputs("b").items()}, output_hidden_states=True
            ).hidden_states
        m = pb.meta
        for p in pts_a:
            assert pb.a[p].dtype == torch.float32 and pb.a[p].shape == (pb.n, 64)
        expect_a = {"embed": ha[0], "resid_post.1": ha[2], "final": ha[-1]}
        expect_b = {"resid_pre.2": hb[2]}
        for p, h in expect_a.items():
            torch.testing.assert_close(pb.a[p], h[m.row, m.pos_a], atol=1e-5, rtol=0)
        for p, h in expect_b.items():
            torch.testing.assert_close(pb.b[p], h[m.row, m.pos_b], atol=1e-5, rtol=0)
        # rows describe the same text on both sides: same chunk, same characters
        for i in range(pb.n):
            text = TEXTS[int(m.text[i])]
            assert m.text[i] == 2 * k + m.row[i]
            span = text[int(m.char_start[i]) : int(m.char_end[i])]
            assert span
        assert pb.filtered["bos"] == len(ab)
        n_total += pb.n
    assert n_total > 50


def test_drop_first_and_massive_filters_are_counted(tiny_pair):
    (plain,) = xa.collect(tiny_pair, TEXTS, ["resid_post.0"], ["resid_post.0"], batch_size=8, progress=False)
    (drop,) = xa.collect(
        tiny_pair, TEXTS, ["resid_post.0"], ["resid_post.0"], batch_size=8, progress=False, drop_first=3
    )
    assert drop.filtered["drop_first"] > 0
    assert drop.n == plain.n - drop.filtered["drop_first"]
    assert bool((drop.meta.start_a > 3).all() and (drop.meta.start_b > 3).all())
    (out,) = xa.collect(
        tiny_pair,
        TEXTS,
        ["resid_post.0"],
        ["resid_post.0"],
        batch_size=8,
        progress=False,
        massive=1.05,
    )
    assert out.filtered["massive"] > 0 and out.n == plain.n - out.filtered["massive"]
    # the same rule as rows.RowFilter applied by hand to the unfiltered rows
    keep, counts = xa.RowFilter(massive=1.05).activations([plain.a["resid_post.0"], plain.b["resid_post.0"]])
    assert counts["massive"] == out.filtered["massive"]
    torch.testing.assert_close(out.a["resid_post.0"], plain.a["resid_post.0"][keep])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"drop_first": 1.5}, "drop_first must be an int >= 0"),
        ({"drop_first": -1}, "drop_first must be an int >= 0"),
        ({"massive": 1.0}, "massive must be None or a factor > 1"),
        ({"clamp": 0}, "clamp must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_collect_refuses_bad_filters(tiny_pair, kw, match):
    with pytest.raises(ValueError, match=match):
        next(xa.collect(tiny_pair, TEXTS, ["resid_post.0"], ["resid_post.0"], progress=False, **kw))


def test_streamed_stats_equal_concatenated(tiny_pair):
    grid = xa.activations.accumulate(
        tiny_pair, TEXTS, ["resid_post.1", "final"], ["resid_pre.2"], batch_size=2, progress=False
    )
    rows = list(
        xa.collect(tiny_pair, TEXTS, ["resid_post.1", "final"], ["resid_pre.2"], batch_size=2, progress=False)
    )
    X = torch.cat([pb.a["final"] for pb in rows])
    Y = torch.cat([pb.b["resid_pre.2"] for pb in rows])
    direct = CrossStats.from_data(X, Y)
    st = grid["final", "resid_pre.2"]
    assert st.n == X.shape[0]
    torch.testing.assert_close(st.cov_xy, direct.cov_xy, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.cov_xx, direct.cov_xx, atol=1e-10, rtol=0)
    assert isinstance(grid, StatsGrid)


def test_bad_input(tiny_pair):
    with pytest.raises(ValueError, match="texts is empty"):
        next(xa.collect(tiny_pair, [], ["embed"], ["embed"], progress=False))
    with pytest.raises(ValueError, match="empty"):
        next(xa.collect(tiny_pair, ["fine", ""], ["embed"], ["embed"], progress=False))
    with pytest.raises(TypeError, match="list of strings"):
        next(xa.collect(tiny_pair, "a single string", ["embed"], ["embed"], progress=False))
    with pytest.raises(ValueError, match=r"points_b: model .* lacks point 'resid_post\.9'"):
        next(xa.collect(tiny_pair, TEXTS, ["embed"], ["resid_post.9"], progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        next(xa.collect(tiny_pair, TEXTS, ["embed"], ["embed"], batch_size=0, progress=False))


def test_nan_and_inf_activations(tiny_pair, monkeypatch):
    b = tiny_pair.b
    real = b.run_with_points

    def poisoned(ids, mask, points, **kw):
        logits, acts = real(ids, mask, points, **kw)
        acts = {p: v.clone() for p, v in acts.items()}
        for v in acts.values():
            v[0, 3, 0] = value
        return logits, acts

    monkeypatch.setattr(b, "run_with_points", poisoned)
    value = float("nan")
    with pytest.raises(
        ValueError, match=r"model B point 'resid_post\.1': inf/NaN activations .*text 0 position 3"
    ):
        next(xa.collect(tiny_pair, TEXTS, ["embed"], ["resid_post.1"], progress=False))
    value = float("inf")
    with pytest.raises(ValueError, match="inf/NaN"):
        next(xa.collect(tiny_pair, TEXTS, ["embed"], ["resid_post.1"], progress=False))
    pb = next(xa.collect(tiny_pair, TEXTS, ["embed"], ["resid_post.1"], progress=False, clamp=50.0))
    assert torch.isfinite(pb.b["resid_post.1"]).all() and pb.b["resid_post.1"].abs().max() == 50.0


def test_long_texts_follow_the_chosen_overflow_policy(tiny_pair):
    long = ["word " * 60]
    with pytest.raises(ValueError, match="longer than|exceeds|max_length"):
        next(xa.collect(tiny_pair, long, ["embed"], ["embed"], max_length=20, progress=False))
    (trunc,) = xa.collect(
        tiny_pair, long, ["embed"], ["embed"], max_length=20, overflow="truncate", progress=False
    )
    assert bool(trunc.batch.truncated.all()) and trunc.n < 60
    (win,) = xa.collect(
        tiny_pair, long, ["embed"], ["embed"], max_length=20, overflow="windows", progress=False
    )
    assert len(win.batch) > 1 and win.n >= 55  # every word lands in some window
    assert bool((win.meta.text == 0).all())


def test_collect_all_concatenates_batches(tiny_pair):
    parts = list(
        xa.collect(tiny_pair, TEXTS, ["resid_post.0"], ["final"], batch_size=2, drop_first=1, progress=False)
    )
    whole = xa.activations.collect_all(
        tiny_pair, TEXTS, ["resid_post.0"], ["final"], batch_size=2, drop_first=1, progress=False
    )
    assert whole.n == sum(pb.n for pb in parts) and whole.batch is None
    assert torch.equal(whole.a["resid_post.0"], torch.cat([pb.a["resid_post.0"] for pb in parts]))
    assert torch.equal(whole.meta.text, torch.cat([pb.meta.text for pb in parts]))
    assert whole.filtered["drop_first"] == sum(pb.filtered["drop_first"] for pb in parts)
    with pytest.raises(ValueError, match="coverage is per aligned batch"):
        whole.coverage()
    with pytest.raises(ValueError, match="nothing to concatenate"):
        xa.activations.concat([])
    # collect's generator straight in: read once, same rows as the list
    streamed = xa.activations.concat(
        xa.collect(tiny_pair, TEXTS, ["resid_post.0"], ["final"], batch_size=2, drop_first=1, progress=False)
    )
    assert torch.equal(streamed.a["resid_post.0"], whole.a["resid_post.0"])
    assert torch.equal(streamed.b["final"], whole.b["final"])
    assert torch.equal(streamed.meta.text, whole.meta.text)
    with pytest.raises(ValueError, match="nothing to concatenate"):
        xa.activations.concat(iter([]))
