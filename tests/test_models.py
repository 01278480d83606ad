"""LensModel: parity with Hugging Face, uniform points across families, packaged models, errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import xlens_align as xa
from xlens_align.points import Point, all_points, forward_stop, parse_point

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest. " * 2,
    "def square(x):\n    return x ** 2  # 日本語のコメント 🙂",
    "In 1969, 3.14159 people landed; \t  whitespace   runs\n\n and émigrés.",
]


def _assert_parity(lens, ref, texts, atol=1e-4):
    ids, mask = lens.to_tokens(texts)
    with torch.no_grad():
        logits, acts = lens.run_with_points(ids, mask, lens.points, return_logits=True)
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    assert (logits - out.logits)[valid].abs().max().item() <= atol
    for layer in range(lens.n_layers):
        torch.testing.assert_close(
            acts[f"resid_pre.{layer}"][valid], out.hidden_states[layer][valid], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(acts["embed"][valid], out.hidden_states[0][valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(acts["final"][valid], out.hidden_states[-1][valid], atol=1e-5, rtol=0)
    # resid_post.L is the input of block L+1
    for layer in range(lens.n_layers - 1):
        torch.testing.assert_close(
            acts[f"resid_post.{layer}"], acts[f"resid_pre.{layer + 1}"], atol=0, rtol=0
        )
    return ids, mask


def test_tiny_llama_matches_hf(tiny_llama_ref):
    lens, ref = tiny_llama_ref
    assert lens.family == "llama"
    assert lens.hf_config.num_key_value_heads < lens.hf_config.num_attention_heads  # GQA
    _assert_parity(lens, ref, TEXTS)


def test_tiny_mistral_matches_hf_beyond_sliding_window(tiny_mistral_ref):
    lens, ref = tiny_mistral_ref
    assert lens.family == "mistral" and lens.sliding_window == 16
    ids, mask = _assert_parity(lens, ref, TEXTS)
    assert mask.sum(1).max() > 2 * lens.sliding_window  # the window is really exercised
    # ... and it matters: without the window the logits differ
    no_window = copy.deepcopy(ref)
    no_window.config.sliding_window = None
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = no_window(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2):
    from transformers import AutoModelForCausalLM

    # The bridge runs HF's eager attention (it needs the pattern hooks); compare with the same kernel:
    # SDPA vs eager alone differ by ~1.5e-4 in SmolLM2's logits.
    path = str(xa.packaged.materialize("smollm2-135m"))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    _assert_parity(smollm2, ref, TEXTS[:2])


@pytest.mark.slow
def test_smollm2_completes_paris_and_prefers_natural_text(smollm2):
    ids, mask = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        out = smollm2.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    completion = smollm2.tokenizer.decode(out[0, ids.shape[1] :])
    assert completion.startswith(" Paris"), completion

    text = (
        "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
        "the members agreed to increase funding for the public library and to repair the old bridge."
    )
    words = text.split()
    random.Random(0).shuffle(words)
    losses = []
    for t in (text, " ".join(words)):
        ids, mask = smollm2.to_tokens(t)
        with torch.no_grad():
            loss = smollm2.bridge(ids, return_type="loss")
        losses.append(loss.item())
    assert losses[0] < losses[1] - 1.0, losses


def test_point_names_identical_across_families():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    tok = xa.tokenizers.llama3_path()
    small = dict(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    llama = xa.testing.tiny_llama(n_layers=3)
    mistral = xa.testing.tiny_mistral(n_layers=3)
    gemma = xa.load_model(
        Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, **small)), tokenizer=tok
    )
    qwen = xa.load_model(Qwen2ForCausalLM(Qwen2Config(**small)), tokenizer=tok)
    assert [m.family for m in (llama, mistral, gemma, qwen)] == ["llama", "mistral", "gemma3", "qwen2"]
    assert llama.points == mistral.points == gemma.points == qwen.points == all_points(3)
    assert llama.points[:4] == ["embed", "resid_pre.0", "resid_mid.0", "resid_post.0"]
    assert llama.points[-1] == "final"
    ids, mask = gemma.to_tokens(["Hello world, a Gemma test sentence that is long enough to slide."])
    for m in (gemma, qwen):
        _, acts = m.run_with_points(ids, mask, m.points)
        assert set(acts) == set(m.points)
        assert all(a.shape == (1, ids.shape[1], 64) for a in acts.values())


def test_hook_names_and_depth(tiny_llama_ref):
    lens, _ = tiny_llama_ref
    assert lens.hook_name("resid_post.-1") == "blocks.2.hook_resid_post"
    assert lens.hook_name("resid_pre.0") == "blocks.0.hook_resid_pre"
    assert lens.hook_name("resid_mid.1") == "blocks.1.hook_resid_mid"
    assert lens.hook_name("embed") == "hook_embed"
    assert lens.hook_name("final") == "ln_final.hook_out"
    assert xa.point_at_depth(lens, 0.0) == "resid_post.0"
    assert xa.point_at_depth(lens, 1.0) == "resid_post.2"
    assert xa.point_at_depth(lens, 0.5, kind="resid_pre") == "resid_pre.1"
    assert all(h in lens.bridge.hook_dict for h in map(lens.hook_name, lens.points))


def test_early_stop_gives_the_same_activations(tiny_llama_ref):
    lens, _ = tiny_llama_ref
    ids, mask = lens.to_tokens(TEXTS[:2])
    with torch.no_grad():
        _, full = lens.run_with_points(ids, mask, lens.points, return_logits=True)
        for pts in (
            ["embed"],
            ["resid_mid.0"],
            ["resid_post.1", "embed"],
            ["resid_post.2"],
            ["final", "resid_pre.1"],
        ):
            logits, part = lens.run_with_points(ids, mask, pts)
            assert logits is None
            for p in pts:
                torch.testing.assert_close(part[p], full[p], atol=0, rtol=0)


def test_point_objects_are_checked_not_reparsed(tiny_llama_ref):
    lens, _ = tiny_llama_ref
    for pt in (Point("resid_post", 2), Point("embed"), Point("final"), Point("resid_mid", 0)):
        assert parse_point(pt, 3) is pt and lens.point(pt) is pt
    assert parse_point(Point("resid_pre", -1), 3) == Point("resid_pre", 2)
    with pytest.raises(
        ValueError, match=r"layer 3 of point 'resid_post\.3' is out of range .*valid: -3\.\.2"
    ):
        parse_point(Point("resid_post", 3), 3)
    with pytest.raises(ValueError, match=r"unknown point 'resid_foo\.1'"):
        parse_point(Point("resid_foo", 1), 3)
    with pytest.raises(ValueError, match=r"unknown point 'embed\.1'"):
        parse_point(Point("embed", 1), 3)
    with pytest.raises(ValueError, match=r"unknown point 'resid_post'"):
        parse_point(Point("resid_post"), 3)


def test_run_with_points_takes_point_objects(tiny_llama_ref):
    lens, _ = tiny_llama_ref
    ids, mask = lens.to_tokens(TEXTS[:1])
    pts = [Point("resid_post", 1), Point("embed")]
    with torch.no_grad():
        _, by_name = lens.run_with_points(ids, mask, ["resid_post.1", "embed"])
        _, by_point = lens.run_with_points(ids, mask, pts)
    assert list(by_point) == pts
    for pt in pts:
        torch.testing.assert_close(by_point[pt], by_name[pt.name], atol=0, rtol=0)
    with pytest.raises(TypeError, match="points must be a list"):
        lens.run_with_points(ids, mask, "resid_post.1")
    with pytest.raises(ValueError, match="at least one residual point"):
        lens.run_with_points(ids, mask, [])


def test_forward_stop():
    P = Point
    assert forward_stop([P("resid_post", 1), P("embed")], 4) == (2, P("resid_post", 1))
    assert forward_stop([P("resid_pre", 0)], 4) == (1, P("resid_pre", 0))
    assert forward_stop([P("embed")], 4) == (None, P("embed"))
    assert forward_stop([P("resid_mid", 3)], 4) == (None, P("resid_mid", 3))
    assert forward_stop([P("final"), P("resid_pre", 0)], 4) == (None, P("final"))


def test_gradients_flow_through_forward_and_its_hooks(tiny_llama_ref):
    """What a hook adds can be trained through B (an adapter trained through B with hooks)."""
    lens, _ = tiny_llama_ref
    ids, mask = lens.to_tokens(TEXTS[:2])
    delta = torch.zeros(lens.d_model, requires_grad=True)
    logits = lens.forward(ids, mask, fwd_hooks=[(Point("resid_post", 1), lambda x, hook: x + delta)])
    logits[mask.bool()].logsumexp(-1).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), lens.forward(ids, mask), atol=0, rtol=0)


def test_bf16_load(tiny_llama_ref):
    hf, tok = xa.testing.tiny_hf("llama", n_layers=2)
    m = xa.load_model(hf, tokenizer=tok, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    ids, mask = m.to_tokens("hello")
    _, acts = m.run_with_points(ids, mask, ["resid_post.1"])
    assert acts["resid_post.1"].dtype == torch.bfloat16


def test_load_from_local_directory(tmp_path):
    hf, tok = xa.testing.tiny_hf("mistral", n_layers=2, seed=3)
    ref = copy.deepcopy(hf)
    hf.save_pretrained(tmp_path)
    xa.tokenizers.mistral_v1().save_pretrained(tmp_path)
    lens = xa.load_model(str(tmp_path))
    assert lens.family == "mistral" and lens.n_layers == 2
    _assert_parity(lens, ref, TEXTS[:1])
    assert lens.config_hash == xa.models.config_hash(ref.config)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_point_lists_valid_points(tiny_llama_ref):
    lens, _ = tiny_llama_ref
    with pytest.raises(ValueError, match=r"unknown point 'resid_foo\.1'.*resid_pre\.0.*final"):
        lens.hook_name("resid_foo.1")
    with pytest.raises(ValueError, match=r"layer 3 .* out of range .* 3 layers \(valid: -3\.\.2\)"):
        lens.hook_name("resid_post.3")
    with pytest.raises(ValueError, match="out of range"):
        lens.hook_name("resid_pre.-4")
    with pytest.raises(TypeError, match="point must be a str"):
        lens.hook_name(3)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        lens.point_at_depth(1.5)


def test_missing_path_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing path"):
        xa.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not an existing path"):
        xa.load_model("no-such-packaged-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        xa.load_model(str(tmp_path))
    with pytest.raises(TypeError, match="source must be"):
        xa.load_model(42)
    with pytest.raises(ValueError, match="tokenizer is required"):
        xa.load_model(xa.testing.tiny_hf("llama", n_layers=1)[0])


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip, not gguf" * 10)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        xa.load_model(str(fake))


def test_unsupported_architecture_names_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128256))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported.*llama.*mistral.*gemma3.*qwen2"):
        xa.load_model(model, tokenizer=xa.tokenizers.llama3_path())


def test_model_pair_requires_lens_models(tiny_llama_ref):
    lens, ref = tiny_llama_ref
    with pytest.raises(TypeError, match="b must be a LensModel"):
        xa.ModelPair(lens, ref)


def test_hub_id_served_by_local_hf_cache(tmp_path):
    """A hub id loads offline when the local Hugging Face cache holds it (no hub reachable)."""
    import os
    import subprocess
    import sys

    hf, _ = xa.testing.tiny_hf("mistral", n_layers=2, seed=5)
    snap = tmp_path / "hub" / "models--tiny-org--tiny-mistral" / "snapshots" / ("0" * 40)
    hf.save_pretrained(snap)
    xa.tokenizers.mistral_v1().save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import xlens_align as xa; m = xa.load_model('tiny-org/tiny-mistral'); "
        "print(m.family, m.n_layers, m.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["mistral", "2", "tiny-org/tiny-mistral"]
    code_missing = "import xlens_align as xa; xa.load_model('tiny-org/not-there')"
    out = subprocess.run(
        [sys.executable, "-c", code_missing], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0 and "hub id 'tiny-org/not-there' is not available" in out.stderr


def test_top_level_api_resolves():
    for name in xa.__all__:
        assert getattr(xa, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = xa.nope


def test_spaced_points():
    from xlens_align.points import point_at_depth, spaced_points

    assert spaced_points(30, 4) == ["resid_post.0", "resid_post.10", "resid_post.19", "resid_post.29"]
    assert spaced_points(30, 4) == [point_at_depth(30, f) for f in (0, 1 / 3, 2 / 3, 1)]
    assert spaced_points(3, 6) == ["resid_post.0", "resid_post.1", "resid_post.2"]  # no repeats
    assert spaced_points(5, 1, "resid_mid") == ["resid_mid.0"]
    with pytest.raises(ValueError, match="k .number of points. must be a positive int"):
        spaced_points(5, 0)
