"""The plain HF twin (`xlens_align.shadow`): the same stream as the bridge, weights shared, and
never used while a hook could act on the pass."""

from __future__ import annotations

import pytest
import torch
from test_suffix import TEXTS, tiny

import xlens_align as xa
from xlens_align import shadow

POINTS = ["embed", "resid_pre.0", "resid_post.0", "resid_pre.2", "resid_post.3", "final"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gemma3"])
def model(request):
    return tiny(request.param)


def _read(m, ids, mask, points, twin):
    m.use_twin = twin
    try:
        with torch.no_grad():
            return m.run_with_points(ids, mask, points)[1]
    finally:
        m.use_twin = True


def test_twin_equals_the_bridge(model):
    ids, mask = model.to_tokens(TEXTS)  # right padding, rows of different lengths
    assert (mask == 0).any()
    left = torch.cat([torch.zeros_like(mask[:, :2]), mask], 1)  # left padding: positions per row
    left_ids = torch.cat([torch.full_like(ids[:, :2], model.pad_token_id), ids], 1)
    for i, k in ((ids, mask), (left_ids, left)):
        for pts in (POINTS, ["resid_post.1"], ["final", "embed"]):
            ref, got = _read(model, i, k, pts, False), _read(model, i, k, pts, True)
            real = k.bool()  # padded positions hold whatever a fully masked query gives: not read
            for p in pts:
                diff = (ref[p][real] - got[p][real]).abs().max().item()
                assert diff <= 1e-6, (model.family, p, diff)
    assert isinstance(getattr(model, "_twin", (None,))[0], torch.nn.Module)  # the twin did run


def test_twin_shares_the_weights(model):
    plain = shadow.twin(model)
    bridged = dict(model.hf_model.named_parameters())
    assert sum(p.numel() for p in plain.parameters()) <= sum(p.numel() for p in bridged.values())
    w = plain.model.layers[1].mlp.down_proj.weight
    assert any(w is p for p in bridged.values())  # the very tensor, no copy
    ids, mask = model.to_tokens(TEXTS[:1])
    before = _read(model, ids, mask, ["resid_post.1"], True)["resid_post.1"].clone()
    with torch.no_grad():
        w.mul_(2.0)  # a weight change through either model is seen by both
        try:
            ref = _read(model, ids, mask, ["resid_post.1"], False)["resid_post.1"]
            got = _read(model, ids, mask, ["resid_post.1"], True)["resid_post.1"]
        finally:
            w.mul_(0.5)
    assert torch.equal(ref, got) and not torch.allclose(got, before)


def test_twin_follows_a_move_of_the_bridge():
    """`.to(dtype)` replaces the bridged modules' buffers (and data): the twin follows."""
    m = tiny.__wrapped__("llama")  # its own model, not the cached one: the move changes it
    ids, mask = m.to_tokens(TEXTS[:2])
    _read(m, ids, mask, ["resid_post.1"], True)  # the twin is built
    m.bridge.to(torch.float64)
    ref = _read(m, ids, mask, ["resid_post.1"], False)["resid_post.1"]
    got = _read(m, ids, mask, ["resid_post.1"], True)["resid_post.1"]
    assert got.dtype == torch.float64 and torch.equal(ref[mask.bool()], got[mask.bool()])
    assert all(b.dtype == torch.float64 for b in shadow.twin(m).buffers() if b.is_floating_point())


def test_hooks_send_the_pass_through_the_bridge(model):
    ids, mask = model.to_tokens(TEXTS[:2])
    clean = _read(model, ids, mask, ["resid_post.2"], True)["resid_post.2"]
    v = torch.full((model.d_model,), 3.0)
    assert not shadow.hooked(model)
    with xa.patch(model, "resid_post.0", v):  # TransformerLens hooks on the bridge
        assert shadow.hooked(model)
        seen = _read(model, ids, mask, ["resid_post.2"], True)["resid_post.2"]
        ref = _read(model, ids, mask, ["resid_post.2"], False)["resid_post.2"]
    assert torch.equal(seen, ref) and (seen - clean).abs().max() > 1e-3
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert shadow.hooked(model)  # a global module hook, too
    finally:
        handle.remove()
    assert not shadow.hooked(model)
    # points the twin does not read, logits and extra hooks go through the bridge
    assert not shadow.serves(model, [model.point("resid_mid.1")], False, ())
    assert not shadow.serves(model, [model.point("resid_post.1")], True, ())
    assert not shadow.serves(
        model, [model.point("resid_post.1")], False, [("resid_post.0", lambda x, hook: x)]
    )
    assert shadow.serves(model, [model.point("resid_post.1")], False, ())
