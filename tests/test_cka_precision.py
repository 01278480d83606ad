"""MinibatchCKA's reduced-precision Gram paths (float32 / TF32 / bfloat16) against float64."""

from __future__ import annotations

import pytest
import torch

from xlens_align import similarity as S
from xlens_align.similarity.fastgram import CUDA_DEFAULT, resolve_precision

F64 = torch.float64


def planted(n: int = 1500, seed: int = 0):
    """Points sharing a latent with graded strength; a large common mean, massive rows, mixed
    widths, an exact copy (CKA 1) and an unrelated point (CKA ~ 0)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)

    def point(d: int, strength: float, mean: float = 0.0) -> torch.Tensor:
        return strength * z @ torch.randn(8, d, generator=g) + torch.randn(n, d, generator=g) + mean

    a = {"a0": point(48, 0.0), "a1": point(48, 0.5, mean=1e3), "a2": point(64, 2.0), "a3": point(48, 1.0)}
    a["a2"][::97, 3] += 3e3  # massive activations on a few rows
    b = {"b0": point(96, 1.0), "b1": point(96, 0.2, mean=-50.0), "b2": 3.0 * a["a2"], "b3": point(32, 3.0)}
    return a, b


def grid(a, b, precision: str, minibatch_size: int | None = 250) -> torch.Tensor:
    return S.MinibatchCKA(minibatch_size=minibatch_size, precision=precision).update(a, b).compute()


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16"])
def test_reduced_precision_within_1e4_of_float64(precision):
    a, b = planted()
    ref = grid(a, b, "float64")
    out = grid(a, b, precision)
    assert out.dtype == F64 and out.shape == (4, 4)
    assert float((out - ref).abs().max()) < 1e-4
    assert float(out[2, 2]) == pytest.approx(1.0, abs=1e-4)  # the exact copy
    assert abs(float(out[0, 0])) < 0.02  # unrelated points
    assert float(ref[3, 3]) > 0.5  # the planted structure is there


def test_float32_hsic_terms_match_u_centred_float64():
    a, b = planted(400)
    acc64 = S.MinibatchCKA(precision="float64").update(a, b)
    acc32 = S.MinibatchCKA(precision="float32").update(a, b)
    for h64, h32 in zip(acc64.mean_hsic(), acc32.mean_hsic(), strict=True):
        assert h32.dtype == F64
        assert torch.allclose(h32, h64, rtol=1e-5, atol=1e-6 * float(h64.abs().max()))


def test_float64_path_is_the_default_on_cpu_and_unchanged():
    a, b = planted(600)
    acc = S.MinibatchCKA(minibatch_size=200)
    assert acc.resolved_precision is None
    out = acc.update(a, b).compute()
    assert acc.resolved_precision == "float64"
    assert torch.equal(out, grid(a, b, "float64", 200))
    # the float64 path is the U-centred one: equals the per-pair direct computation
    bounds = [(0, 200), (200, 400), (400, 600)]
    num = aa = bb = 0.0
    for s, e in bounds:
        k, l_ = S.gram_linear(a["a3"][s:e]), S.gram_linear(b["b0"][s:e])
        num += S.hsic_unbiased(k, l_)
        aa += S.hsic_unbiased(k, k)
        bb += S.hsic_unbiased(l_, l_)
    assert float(out[3, 0]) == pytest.approx(num / (aa * bb) ** 0.5, abs=1e-10)
    assert resolve_precision("auto", torch.device("cuda")) == CUDA_DEFAULT
    assert resolve_precision("tf32", torch.device("cpu")) == "tf32"


def test_reduced_precision_rechunking_pending_and_errors():
    a, b = planted(700)
    acc = S.MinibatchCKA(minibatch_size=256, precision="bf16")
    for s, e in [(0, 100), (100, 450), (450, 700)]:
        acc.update({k: v[s:e] for k, v in a.items()}, {k: v[s:e] for k, v in b.items()})
    assert acc.n_minibatches == 2 and acc.pending_rows == 188
    ref = S.MinibatchCKA(minibatch_size=256, precision="float64").update(a, b).compute()
    assert float((acc.compute() - ref).abs().max()) < 1e-4
    bad = dict(b)
    bad["b1"] = b["b1"].clone()
    bad["b1"][3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"acts_b\['b1'\] contains"):
        S.MinibatchCKA(precision="bf16").update(a, bad)
    with pytest.raises(ValueError, match="precision must be"):
        S.MinibatchCKA(precision="fp8")


def test_reduced_precision_scale_invariant_at_extreme_magnitudes():
    a, b = planted(500)
    ref = grid(a, b, "float32")
    huge = grid(
        {k: v.double() * 1e200 for k, v in a.items()},
        {k: v.double() * 1e-200 for k, v in b.items()},
        "float32",
    )
    assert float((huge - ref).abs().max()) < 1e-6


def test_float32_mean_overflow_falls_back_to_float64():
    a, b = planted(500)
    tiny = {k: (v * 1e-30).float() for k, v in a.items()}
    later = {k: (v * 1e10).float() for k, v in a.items()}  # scaled by the first update's 2**100: overflows
    acc = S.MinibatchCKA(precision="bf16").update(tiny, b).update(later, b)
    ref = S.MinibatchCKA(precision="float64").update(tiny, b).update(later, b)
    assert acc.n_minibatches == 2  # the second one overflowed float32 and went the float64 way
    (hab, haa, hbb), (hab64, haa64, hbb64) = acc.mean_hsic(), ref.mean_hsic()
    assert torch.allclose(hab, hab64, rtol=1e-6) and torch.allclose(haa, haa64, rtol=1e-6)  # 2nd dominates
    assert torch.allclose(hbb, hbb64, rtol=1e-3)  # B: half bfloat16, half float64


def test_centring_only_where_the_mean_is_large_and_unscaled_grams_rescaled_exactly():
    from xlens_align.similarity.fastgram import CENTRE_RATIO, _needs_centring

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, 40, generator=g)
    shift = torch.randn(40, generator=g)
    spread = 40.0  # mean squared distance of a row to the mean: d * 1
    x[1] += shift / shift.norm() * (0.5 * CENTRE_RATIO * spread) ** 0.5  # under the threshold
    x[2] += shift / shift.norm() * (2.0 * CENTRE_RATIO * spread) ** 0.5  # over it
    assert _needs_centring(x) == [False, False, True]
    # zero-mean points skip the centring, a point with a mean just under the threshold too: both
    # stay within 1e-4 of float64 (planted() mixes them with means of 1e3 and -50, which centre)
    a, b = planted(600, seed=1)
    off = torch.randn(48, generator=g)
    a["a0"] = a["a0"] + off / off.norm() * (0.9 * CENTRE_RATIO * 48) ** 0.5
    ref = grid(a, b, "float64", 200)
    for precision in ("float32", "tf32", "bf16"):
        assert float((grid(a, b, precision, 200) - ref).abs().max()) < 1e-4
    # magnitudes inside 2**+-SAFE_EXP go in unscaled: same CKA as the unit-scale features
    small = grid({k: v * 3e-5 for k, v in a.items()}, {k: v * 7e4 for k, v in b.items()}, "float32", 200)
    assert float((small - grid(a, b, "float32", 200)).abs().max()) < 1e-6
