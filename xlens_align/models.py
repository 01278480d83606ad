"""`LensModel`: a TransformerLens `TransformerBridge` with uniform residual-point names.

`load_model(source)` accepts a local Hugging Face model directory, a GGUF file, an in-memory
HF model (plus tokenizer), a hub id (where a hub or the local HF cache serves it) or the name
of a packaged model (`"smollm2-135m"`, `"gemma3-270m"`). The bridge is left in its default mode,
which keeps Hugging Face's numerics: ``resid_pre.L`` equals HF ``hidden_states[L]`` and ``final``
equals ``hidden_states[-1]``, so maps fit here apply unchanged to raw HF / nnsight models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import shadow
from .loading import check_device, load_hf, tokenizer_dir
from .points import Point, all_points, forward_stop, parse_point, spaced_points
from .points import point_at_depth as _point_at_depth
from .tokens import AlignedBatch, align

__all__ = ["SUPPORTED_FAMILIES", "LensModel", "ModelPair", "load_model", "point_at_depth"]

# HF architecture -> family name. These have been checked to expose every residual point with the
# same hook names through TransformerBridge (tests/test_models.py).
SUPPORTED_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen2ForCausalLM": "qwen2",
}


def _supported_message() -> str:
    fams = ", ".join(f"{f} ({a})" for a, f in SUPPORTED_FAMILIES.items())
    return f"supported families: {fams}"


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every requested point was captured."""


class LensModel:
    """A `TransformerBridge` plus tokenizer with uniform residual points.

    Attributes: `bridge`, `tokenizer`, `tokenizer_path`, `family`, `name`, `model_id`,
    `config_hash`, `d_model`, `n_layers`, `n_ctx`, `vocab_size`, `points`, `device`, `dtype`, `bridge_mode`.
    """

    def __init__(self, bridge: Any, tokenizer: Any, tokenizer_path: str | Path, name: str) -> None:
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.tokenizer_path = Path(tokenizer_path)
        self.name = name
        hf_config = self.hf_model.config
        arch = type(self.hf_model).__name__
        self.family = SUPPORTED_FAMILIES[arch]
        self.d_model: int = int(bridge.cfg.d_model)
        self.n_layers: int = int(bridge.cfg.n_layers)
        text_cfg = getattr(hf_config, "text_config", hf_config)
        self.n_ctx: int = int(getattr(text_cfg, "max_position_embeddings", None) or bridge.cfg.n_ctx)
        self.sliding_window: int | None = getattr(text_cfg, "sliding_window", None)
        self.points: list[str] = all_points(self.n_layers)
        self.config_hash: str = config_hash(hf_config)
        self.vocab_size: int = int(self.hf_model.get_input_embeddings().num_embeddings)
        self.bridge_mode = "compat" if getattr(bridge, "compatibility_mode", False) else "hf"

    # -- identity --------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.name

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.bridge.original_model

    @property
    def hf_config(self) -> Any:
        return self.hf_model.config

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its eos id when it has none (padding is always masked)."""
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id, 0):
            if tid is not None:
                return int(tid)
        return 0

    def __repr__(self) -> str:
        return (
            f"LensModel({self.name!r}, family={self.family!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )

    # -- points ----------------------------------------------------------------------------------
    def point(self, point: str | Point) -> Point:
        """Resolve a point name (negative layers allowed); ValueError lists the valid names."""
        return parse_point(point, self.n_layers)

    def hook_name(self, point: str | Point) -> str:
        """TransformerLens hook name of `point`, e.g. 'resid_post.3' -> 'blocks.3.hook_resid_post'."""
        return self.point(point).hook_name()

    def point_at_depth(self, fraction: float, kind: str = "resid_post") -> str:
        return _point_at_depth(self.n_layers, fraction, kind)

    def spaced_points(self, k: int, kind: str = "resid_post") -> list[str]:
        """`k` `kind` points evenly spaced over depth (see `points.spaced_points`)."""
        return spaced_points(self.n_layers, k, kind)

    # -- running ---------------------------------------------------------------------------------
    def to_tokens(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize with BOS as the tokenizer adds it, right-padded: (input_ids, attention_mask)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = [self.tokenizer(t)["input_ids"] for t in texts]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = 1
        return ids.to(self.device), mask.to(self.device)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        fwd_hooks: Sequence[tuple[str | Point, Any]] = (),
    ) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the bridge with optional extra TransformerLens hooks (points allowed).

        Autograd flows through the pass and through the hooks (e.g. to train what a hook adds)."""
        hooks = [(self._hook(n), f) for n, f in fwd_hooks]
        return self.bridge.run_with_hooks(
            input_ids, fwd_hooks=hooks, **self._forward_kwargs(input_ids, attention_mask)
        )

    def _forward_kwargs(self, input_ids: Tensor, attention_mask: Tensor | None) -> dict[str, Any]:
        """Checked input ids (ids outside the vocabulary named, at one min/max per batch) and the
        bridge's keyword arguments."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be a [batch, pos] LongTensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"input_ids hold token id {lo if lo < 0 else hi}, outside the vocabulary of model "
                    f"{self.name!r} (ids 0..{self.vocab_size - 1}, vocabulary size {self.vocab_size}); they do not "
                    f"come from its tokenizer {str(self.tokenizer_path)!r}: tokenize with model.to_tokens"
                )
        kw: dict[str, Any] = {}
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            kw["attention_mask"] = attention_mask
        return kw

    def _hook(self, name: str | Point) -> str:
        """Accept a point (name or `Point`) or a raw TransformerLens hook name."""
        if name in self.bridge.hook_dict:
            return name
        return self.hook_name(name)

    #: read hook-free points through the plain HF twin (`shadow`); False: always the bridge
    use_twin: bool = True

    def run_with_points(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        points: Sequence[str | Point],
        *,
        return_logits: bool = False,
        fwd_hooks: Sequence[tuple[str | Point, Any]] = (),
    ) -> tuple[Tensor | None, dict[str | Point, Tensor]]:
        """Capture the residual stream at `points` in one forward pass.

        Hooks sit only on the requested points. Without `return_logits` the pass stops right
        after the deepest point: through TransformerLens's `stop_at_layer` when the deepest
        point lies before the last block, and by ending the pass from the deepest point's hook
        otherwise (so the unembedding, the largest matrix of a 128k-vocabulary model, is skipped).
        Returns (logits or None, {point: [batch, pos, d_model]}), keyed by the points as given
        (names or `Point` objects). Where the pass may stop is `points.forward_stop`. With no
        hook anywhere and no logits asked, the pass runs the plain HF twin of the bridged model
        (`shadow`: the same weights and numbers, without the bridge's per-operation hooks);
        ``model.use_twin = False`` keeps it on the bridge.
        """
        if isinstance(points, str | Point):
            raise TypeError(f"points must be a list of points such as ['resid_post.3'], got {points!r}")
        resolved = {p: self.point(p) for p in points}
        stop_at, deepest = forward_stop(resolved.values(), self.n_layers)
        if return_logits:
            stop_at, raise_after = None, None
        else:
            raise_after = deepest.hook_name() if stop_at is None else None
        by_hook: dict[str, list[str | Point]] = {}
        for name, pt in resolved.items():
            by_hook.setdefault(pt.hook_name(), []).append(name)
        store: dict[str | Point, Tensor] = {}

        def capture(hook_name: str):
            def fn(x: Tensor, hook: Any) -> Tensor:
                for n in by_hook[hook_name]:
                    store[n] = x
                if hook_name == raise_after:
                    raise _StopForward
                return x

            return fn

        kw = self._forward_kwargs(input_ids, attention_mask)
        if shadow.serves(self, resolved.values(), return_logits, fwd_hooks):
            return None, shadow.points_from_twin(self, input_ids, attention_mask, resolved, deepest)
        hooks = [(self._hook(n), f) for n, f in fwd_hooks]
        hooks += [(h, capture(h)) for h in by_hook]
        logits = None
        try:
            out = self.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, stop_at_layer=stop_at, **kw)
            logits = out if return_logits else None
        except _StopForward:
            pass
        missing = [p for p in points if p not in store]
        if missing:
            raise RuntimeError(f"the forward pass did not reach points {missing} (hooks never fired)")
        return logits, {p: store[p] for p in points}


def point_at_depth(model: LensModel, fraction: float, kind: str = "resid_post") -> str:
    """The point at relative depth `fraction` of `model` (see `points.point_at_depth`)."""
    return model.point_at_depth(fraction, kind)


def config_hash(hf_config: Any) -> str:
    """Short sha256 of the architecture-defining fields of an HF config."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    drop = {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "architectures",
        "use_cache",
        "name_or_path",
    }
    keep = {k: v for k, v in sorted(d.items()) if k not in drop and not k.startswith("_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def load_model(
    source: str | os.PathLike | torch.nn.Module,
    tokenizer: Any = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> LensModel:
    """Load a model and wrap it in a TransformerBridge (default, HF-numerics mode).

    source: a packaged model name (`"smollm2-135m"`, `"gemma3-270m"`), a local HF model
    directory, a `.gguf` file, an in-memory HF causal LM (then `tokenizer` is required: a
    tokenizer object or a directory), or a hub id (served by a hub or the local HF cache).
    tokenizer: a directory, or a tokenizer object (saved to the cache, since TransformerLens
    needs a tokenizer saved to a directory); default: the model's own.
    The HF model passed in is changed in place by the bridge: deep-copy it first if needed.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    device = check_device(device)  # before any weight is read
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok_path = None if tokenizer is None else tokenizer_dir(tokenizer)
    tok = None if tok_path is None else _load_tokenizer(tok_path)  # a bad tokenizer fails before the weights
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "tokenizer is required when source is an in-memory model (a directory or object)"
            )
        hf_model = source
        model_name = name or getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
    elif isinstance(source, (str, os.PathLike)):
        hf_model, tok_default, model_name = load_hf(str(source), dtype, need_tokenizer=tok is None)
        if tok_path is None:
            tok_path = tokenizer_dir(tok_default)
            tok = _load_tokenizer(tok_path)
        model_name = name or model_name
    else:
        raise TypeError(
            "source must be a packaged model name, a path, a hub id or an HF model, "
            f"got {type(source).__name__}"
        )
    arch = type(hf_model).__name__
    if arch not in SUPPORTED_FAMILIES:
        raise ValueError(f"architecture {arch!r} is not supported; {_supported_message()}")
    _check_vocab(tok, hf_model, model_name)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [arch]  # the bridge picks its adapter from this field
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            str(tok_path), hf_model=hf_model, tokenizer=tok, device=str(device)
        )
    except (ValueError, NotImplementedError, KeyError) as e:
        raise ValueError(f"TransformerBridge could not wrap {arch}: {e}; {_supported_message()}") from e
    bridge.eval()
    return LensModel(bridge, tok, tok_path, model_name)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {str(path)!r} ({type(e).__name__}: {e}); "
            "pass tokenizer=<the model's tokenizer directory or object>"
        ) from e


def _check_vocab(tok: Any, hf_model: torch.nn.Module, model_name: str) -> None:
    """Refuse a tokenizer that can produce ids beyond the model's embedding rows."""
    rows = int(hf_model.get_input_embeddings().num_embeddings)
    n_ids = max(len(tok), max(getattr(tok, "added_tokens_decoder", {}) or {}, default=-1) + 1)
    if n_ids > rows:
        raise ValueError(
            f"tokenizer {tok.name_or_path!r} produces token ids up to {n_ids - 1}, but model {model_name!r} "
            f"has a vocabulary of {rows} (embedding rows): the tokenizer does not match the model; "
            "pass the model's own tokenizer="
        )


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------


# what every model of a pair offers (LensModel and remote.RemoteModel)
_MODEL_ATTRS = ("tokenizer", "points", "point", "n_ctx", "d_model", "run_with_points", "to_tokens")


class ModelPair:
    """Two models compared position by position on the same texts: `LensModel`s, or anything
    with their attributes (a `remote.RemoteModel`)."""

    def __init__(self, a: LensModel, b: LensModel) -> None:
        for side, m in (("a", a), ("b", b)):
            missing = [k for k in _MODEL_ATTRS if not hasattr(m, k)]
            if missing:
                raise TypeError(
                    f"{side} must be a LensModel (xlens_align.load_model) or a remote.RemoteModel, "
                    f"got {type(m).__name__} (it lacks {missing})"
                )
        self.a, self.b = a, b

    def __iter__(self) -> Iterator[LensModel]:
        return iter((self.a, self.b))

    def __repr__(self) -> str:
        return f"ModelPair(a={self.a.name!r}, b={self.b.name!r})"

    def align(self, texts: Sequence[str], **kwargs: Any) -> AlignedBatch:
        """Tokenize `texts` with both models' tokenizers and align chunks (see `tokens.align`)."""
        kwargs.setdefault("max_length", min(self.a.n_ctx, self.b.n_ctx))
        return align(self.a.tokenizer, self.b.tokenizer, texts, **kwargs)
