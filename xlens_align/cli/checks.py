"""The demo's checks: each model's points and logits against its Hugging Face forward.

For a local model (`LensModel`) every point kind is compared with the HF model's own numbers on
two texts (padding left out): ``embed`` and ``resid_pre.L`` with ``hidden_states[0]`` /
``hidden_states[L]``, ``resid_mid.L`` with the input of the norm before the MLP and
``resid_post.L`` with decoder layer L's output (forward hooks on the HF modules), ``final`` with
``hidden_states[-1]``, and the logits. A remote model gets the logits / final check of its raw HF
forward on the server. tests/test_parity.py checks the same against an untouched eager copy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROMPT", "forward_check", "parity"]

PROMPT = "The capital of France is"
TEXTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep forest.",
    "def square(x):\n    return x ** 2  # émigrés 🙂",
)
_MID_NORM = {"gemma3": "pre_feedforward_layernorm"}  # others: post_attention_layernorm


def forward_check(m: Any) -> dict[str, Any]:
    """Max |logits - HF logits| and |final - hidden_states[-1]| on `PROMPT`, and B's next token."""
    import torch

    ids, mask = m.to_tokens(PROMPT)
    with torch.no_grad():
        logits, acts = m.run_with_points(ids, mask, ["final"], return_logits=True)
        hf = m.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return {
        "logits_diff": (logits - hf.logits).abs().max().item(),
        "final_diff": (acts["final"] - hf.hidden_states[-1]).abs().max().item(),
        "next_token": m.tokenizer.decode(logits[0, -1].argmax()),
    }


def _hf_values(m: Any, ids: Any, mask: Any) -> dict[str, list] | None:
    """HF's value of every point kind (None when the decoder layers are not where expected)."""
    import torch

    hf = m.hf_model
    layers = getattr(getattr(hf, "model", None), "layers", None)
    norm = _MID_NORM.get(m.family, "post_attention_layernorm")
    if layers is None or len(layers) != m.n_layers or not all(hasattr(la, norm) for la in layers):
        return None
    mid: list[Any] = []
    post: list[Any] = []
    hooks = [getattr(la, norm).register_forward_hook(lambda mod, a, o: mid.append(a[0])) for la in layers]
    hooks += [
        la.register_forward_hook(lambda mod, a, o: post.append(o[0] if isinstance(o, tuple) else o))
        for la in layers
    ]
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    return {
        "embed": [hs[0]],
        "resid_pre": list(hs[: m.n_layers]),
        "resid_mid": mid,
        "resid_post": post,
        "final": [hs[-1]],
        "logits": [out.logits],
    }


def parity(m: Any) -> dict[str, float] | None:
    """Max abs difference per point kind, bridge vs HF, over layers and real positions (None for
    a model that is not a local `LensModel`)."""
    import torch

    from xlens_align.models import LensModel

    if not isinstance(m, LensModel):
        return None
    ids, mask = m.to_tokens(list(TEXTS))
    with torch.no_grad():
        logits, acts = m.run_with_points(ids, mask, m.points, return_logits=True)
    want = _hf_values(m, ids, mask)
    if want is None:
        return None
    got = {"embed": [acts["embed"]], "final": [acts["final"]], "logits": [logits]}
    for kind in ("resid_pre", "resid_mid", "resid_post"):
        got[kind] = [acts[f"{kind}.{layer}"] for layer in range(m.n_layers)]
    valid = mask.bool()
    return {
        kind: max(float((g - w)[valid].abs().max()) for g, w in zip(got[kind], want[kind], strict=True))
        for kind in want
    }
