"""`RemoteModel`: a model served by NDIF, with the residual points and methods of `LensModel`.

>>> b = xa.remote.RemoteModel("mistralai/Mistral-7B-v0.1", host="https://api.ndif.us", api_key=...)
>>> pair = xa.ModelPair(a, b)          # a local LensModel, or another RemoteModel

Tokenizing, alignment, maps and scoring stay local; only forward passes go to the server. One
request carries one batch: `run_with_points` saves every requested point in one trace, and
`run_patched` (which `patching.forward_patched` calls) writes values computed locally into the
stream inside the trace and returns the logits. Results are checked for shape (nnsight may drop
the batch dimension of a remote result) and for inf/NaN. The model's config and tokenizer are read
locally (a local directory, or the local Hugging Face cache for a hub id); the weights never are.

A remote model never runs locally: the only backends used are the bounded NDIF backend of
`client` and, for ``host="local"`` (an explicit choice, for tests), nnsight's own serialize /
deserialize dry run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..models import SUPPORTED_FAMILIES, LensModel, config_hash
from ..points import Point, all_points
from . import client
from .modules import sites_in_order
from .writes import nbytes, rows_of, write_of

__all__ = ["RemoteModel"]


class RemoteModel:
    """A causal LM run on an NDIF server through nnsight, duck-typing `LensModel`.

    source: a hub id or a local model directory (the key the deployment was made with).
    host / api_key: the NDIF server (default ``NDIF_HOST`` / ``NDIF_API_KEY``, then nnsight's
    configuration, i.e. the hosted NDIF); ``host="local"`` runs nnsight's local dry run of the
    remote path instead (weights loaded here; for tests). tokenizer: a directory or hub id
    (default: `source`). timeout: seconds one request may take from sending to result;
    connect_timeout: seconds to connect and get a session. dtype: the dtype the deployment runs
    in (values written into the stream are sent in it). check: ask the server's ``/status`` now
    whether the model is deployed and running (else before the first request).
    max_request_bytes: the most bytes of patch values one request carries (larger patches are
    split by batch rows over several requests).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        host: str | None = None,
        api_key: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        check: bool = True,
        max_request_bytes: int = 768 * 1024,
    ) -> None:
        if not isinstance(source, str | os.PathLike) or not str(source):
            raise TypeError(f"source must be a hub id or a model directory, got {source!r}")
        for arg, v in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise ValueError(f"{arg} must be a finite number of seconds > 0, got {v!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.source = _source_id(source)
        self.local_dry_run = host == "local"
        self.host, self.api_key = ("local", "") if self.local_dry_run else client.resolve_host(host, api_key)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        if (
            isinstance(max_request_bytes, bool)
            or not isinstance(max_request_bytes, int)
            or max_request_bytes < 1
        ):
            raise ValueError(f"max_request_bytes must be a positive int, got {max_request_bytes!r}")
        self.max_request_bytes = max_request_bytes
        self.name = name or (Path(self.source).name if Path(self.source).is_dir() else self.source)
        self._dtype = dtype
        self.hf_config = _config(self.source)
        arch = (getattr(self.hf_config, "architectures", None) or ["?"])[0]
        if arch not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"source {self.source!r}: architecture {arch!r} has no residual-point mapping; "
                f"supported: {sorted(SUPPORTED_FAMILIES)}"
            )
        self.family = SUPPORTED_FAMILIES[arch]
        text_cfg = getattr(self.hf_config, "text_config", self.hf_config)
        self.d_model = int(text_cfg.hidden_size)
        self.n_layers = int(text_cfg.num_hidden_layers)
        self.n_ctx = int(text_cfg.max_position_embeddings)
        self.vocab_size = int(text_cfg.vocab_size)
        self.sliding_window = getattr(text_cfg, "sliding_window", None)
        self.points = all_points(self.n_layers)
        self.config_hash = config_hash(self.hf_config)
        self.bridge_mode = "hf"  # raw HF modules: the bridge's default numerics
        self.tokenizer_path = Path(tokenizer) if tokenizer is not None else Path(self.source)
        self.tokenizer = _tokenizer(str(tokenizer) if tokenizer is not None else self.source)
        self._lm = _language_model(self.source, self.tokenizer_path)
        self.model_key = self._lm.to_model_key()
        self._checked = False
        self._writing: list[dict[Point, tuple[Any, Any]]] = []  # open xa.patch blocks
        if check:
            self.check()

    # -- identity (the same attributes as LensModel) -------------------------------------------
    model_id = property(lambda self: self.name)
    device = property(lambda self: torch.device("cpu"))  # where values are made and results land
    dtype = property(lambda self: self._dtype)
    pad_token_id = LensModel.pad_token_id
    point = LensModel.point
    point_at_depth = LensModel.point_at_depth
    spaced_points = LensModel.spaced_points
    to_tokens = LensModel.to_tokens
    _forward_kwargs = LensModel._forward_kwargs

    def __repr__(self) -> str:
        return (
            f"RemoteModel({self.name!r}, family={self.family!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, host={self.host!r})"
        )

    @property
    def bridge(self) -> Any:
        raise AttributeError(
            f"{self!r} runs on a server: it has no TransformerBridge nor TransformerLens hooks. Patch it "
            "with an xa.patch block around forward(), or xlens_align.patching.forward_patched(model, ids, "
            "mask, {point: (values, positions)}); read points with run_with_points"
        )

    def module_path(self, point: str | Point) -> str:
        """Where `point` is read in the HF module tree, e.g. 'model.layers.3 (output)'."""
        (s,) = sites_in_order(self.family, [self.point(point)], self.n_layers)
        return f"{s.path} ({s.side})"

    def hook_name(self, point: str | Point) -> str:
        """The module path of `point` (a remote model has no TransformerLens hooks)."""
        return self.module_path(point)

    def check(self) -> None:
        """Raise `ModelNotDeployed` unless the host reports the model's deployment RUNNING
        (`ServerUnreachable` / `RemoteTimeout` when the host does not answer)."""
        if self.local_dry_run:
            self._checked = True
            return
        states = client.deployment_states(self.host, self.api_key, self.connect_timeout)
        state = states.get(self.model_key, "NOT_DEPLOYED")
        if state != "RUNNING":
            running = sorted(k for k, s in states.items() if s == "RUNNING")
            raise client.ModelNotDeployed(
                f"model {self.source!r} is {state} on NDIF host {self.host} (model key {self.model_key}); "
                f"running there: {running or 'nothing'}. Deploy it (or fix the source) first"
            )
        self._checked = True

    # -- running -------------------------------------------------------------------------------
    def run_with_points(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        points: Sequence[str | Point],
        *,
        return_logits: bool = False,
        fwd_hooks: Sequence[Any] = (),
    ) -> tuple[Tensor | None, dict[str | Point, Tensor]]:
        """Every requested point (and the logits if asked) from one remote trace; keyed by the
        points as given, each [batch, pos, d_model] on the CPU."""
        if fwd_hooks:
            raise TypeError(f"fwd_hooks: {self!r} takes no TransformerLens hooks; patch with forward_patched")
        if self._writing:
            raise RuntimeError(
                f"{self!r}: run_with_points inside an xa.patch block would not see the patch; call "
                "forward() inside the block, or read the points outside it"
            )
        if isinstance(points, str | Point) or not points:
            raise TypeError(
                f"points must be a non-empty list of points such as ['resid_post.3'], got {points!r}"
            )
        resolved = {p: self.point(p) for p in points}
        sites = sites_in_order(self.family, list(resolved.values()), self.n_layers)
        steps = [(self._envoy(s.path), s.side, None, True) for s in sites]
        acts, logits, _ = self._trace(input_ids, attention_mask, steps, return_logits)
        got = {}
        for s, x in zip(sites, acts, strict=True):
            got[s.point] = self._checked_result(x, input_ids.shape, self.d_model, s.point.name)
        return logits, {p: got[resolved[p]] for p in points}

    def run_patched(
        self, input_ids: Tensor, attention_mask: Tensor | None, spec: Mapping[Point, tuple[Any, Any]]
    ) -> Tensor:
        """Logits [batch, pos, vocab] with ``spec = {point: (values, positions)}`` written into
        the stream inside the trace (values computed locally; positions as in `patching`).

        One request, unless the values written pass `max_request_bytes` (ndif 0.1.2's API refuses
        request bodies over about 1 MiB): then the batch rows are split over as few requests as
        keep each under it (rows are independent, so the logits are the same)."""
        B, T = input_ids.shape
        writes = {}
        for pt, (values, positions) in spec.items():
            writes[self.point(pt)] = write_of(pt, values, positions, (B, T, self.d_model), self._dtype)
        size = sum(v.numel() * v.element_size() + sum(nbytes(i) for i in idx) for idx, v in writes.values())
        if size > self.max_request_bytes and B > 1:
            step = max(1, int(B * self.max_request_bytes // size))
            return torch.cat([
                self.run_patched(
                    input_ids[r : r + step],
                    None if attention_mask is None else attention_mask[r : r + step],
                    {pt: rows_of(v, pos, r, r + step, B) for pt, (v, pos) in spec.items()},
                )
                for r in range(0, B, step)
            ])  # fmt: skip
        sites = sites_in_order(self.family, list(writes), self.n_layers)
        steps = [(self._envoy(s.path), s.side, writes[s.point], s.in_place) for s in sites]
        return self._trace(input_ids, attention_mask, steps, True)[1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, fwd_hooks: Sequence[Any] = ()):
        """Logits [batch, pos, vocab] from one request: clean, or with the writes of the open
        `xa.patch` blocks (the innermost block wins where two write the same point)."""
        if fwd_hooks:
            raise TypeError(f"fwd_hooks: {self!r} takes no TransformerLens hooks; patch with forward_patched")
        spec: dict[Point, tuple[Any, Any]] = {}
        for block in self._writing:
            spec.update(block)
        return self.run_patched(input_ids, attention_mask, spec)

    @contextlib.contextmanager
    def writing(self, spec: Mapping[Point, tuple[Any, Any]]) -> Iterator[None]:
        """While open, `forward` writes ``spec = {point: (values, positions)}`` (what `xa.patch`
        uses for a remote model). `run_with_points` refuses to run inside: it would not see them."""
        self._writing.append(dict(spec))
        try:
            yield
        finally:
            self._writing.pop()

    @property
    def hf_model(self) -> Any:
        """The raw HF forward, run as one request: ``hf_model(input_ids=..., attention_mask=...,
        output_hidden_states=True)`` returns an object with ``.logits`` and ``.hidden_states`` (a
        check of the point mapping against HF's own outputs, as the CLI's forward check does)."""
        return self._hf_forward

    def _hf_forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> SimpleNamespace:
        _, logits, states = self._trace(input_ids, attention_mask, [], True, bool(output_hidden_states))
        return SimpleNamespace(logits=logits, hidden_states=None if states is None else tuple(states))

    # -- one request -------------------------------------------------------------------------------
    def _envoy(self, path: str) -> Any:
        e = self._lm
        for part in path.split("."):
            e = e[int(part)] if part.isdigit() else getattr(e, part)
        return e

    def _trace(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        steps: list,
        want_logits: bool,
        hidden: bool = False,
    ) -> tuple[list[Tensor], Tensor | None, list[Tensor] | None]:
        """One request: read (write is None) or write each (envoy, side, write, in_place) in forward
        order (`modules.Site.in_place`); returns the reads, the logits (checked) or None, and HF's
        ``hidden_states`` (checked) when `hidden`."""
        import nnsight

        self._forward_kwargs(input_ids, attention_mask)  # shape, dtype, ids inside the vocabulary
        inputs = {"input_ids": input_ids.detach().cpu().long()}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.detach().cpu().long()
        if hidden:
            inputs["output_hidden_states"] = True
        if not self._checked:
            self.check()
        if self.local_dry_run:
            kw: dict[str, Any] = {"remote": "local"}
        else:
            env = self._lm._remoteable_get_env()
            kw = {"backend": client.BoundedBackend(
                self.model_key, self.host, self.api_key, env, self.timeout, self.connect_timeout
            )}  # fmt: skip
        lm = self._lm
        where = f"model {self.source!r} on NDIF host {self.host}"
        acts, logits, states = [], None, None  # saved names are pushed back into this frame by the trace
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", UserWarning)
                with lm.trace(inputs, **kw):
                    acts = []
                    for envoy, side, write, in_place in steps:
                        x = envoy.output if side == "output" else envoy.input
                        if write is None:
                            acts.append(x)
                        elif in_place:
                            x[write[0]] = write[1]
                        else:
                            x = x.clone()
                            x[write[0]] = write[1]
                            envoy.input = x
                    acts = nnsight.save(acts)
                    logits = lm.output.logits.save() if want_logits else None
                    states = nnsight.save(list(lm.output.hidden_states)) if hidden else None
        except Exception as e:
            err = client.translate(e, where)
            if err is None:
                raise
            raise err from e
        if want_logits:
            logits = self._checked_result(logits, input_ids.shape, self.vocab_size, "logits")
        if hidden:
            states = [self._checked_result(h, input_ids.shape, self.d_model, "hidden_states") for h in states]
        return [a.detach() for a in acts], logits, states

    def _checked_result(self, x: Any, shape: torch.Size, width: int, what: str) -> Tensor:
        B, T = int(shape[0]), int(shape[1])
        if not isinstance(x, Tensor):
            raise client.RemoteResultError(
                f"{self.name}: {what} came back as {type(x).__name__}, not a tensor"
            )
        x = x.detach().cpu()
        if x.ndim == 2 and B == 1 and tuple(x.shape) == (T, width):
            x = x.unsqueeze(0)  # nnsight may drop a batch dimension of 1 remotely
        if tuple(x.shape) != (B, T, width):
            raise client.RemoteResultError(
                f"{self.name} on {self.host}: {what} came back with shape {tuple(x.shape)}, expected {(B, T, width)}"
            )
        if not torch.isfinite(x).all():
            n = int((~torch.isfinite(x)).sum())
            raise client.RemoteResultError(f"{self.name} on {self.host}: {what} contains {n} inf/NaN values")
        return x


def _source_id(source: str | os.PathLike) -> str:
    p = Path(source).expanduser()
    return str(p.resolve()) if p.is_dir() else str(source)


def _config(source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"source {source!r}: no local config (a model directory, or a hub id in the local Hugging Face "
            f"cache, is needed for the tokenizer and the point mapping): {e}"
        ) from e


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer {path!r}: cannot load it locally: {e}") from e


def _language_model(source: str, tokenizer_path: Path) -> Any:
    """nnsight's text-generation model on the meta device (its key is what the server deploys)."""
    from nnsight.modeling.huggingface import _ID_CACHE
    from nnsight.modeling.transformers import TransformersModel

    _ID_CACHE.setdefault(source, source)  # no hub lookup for the key: the source is the id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(source, task="text-generation", tokenizer=str(tokenizer_path))
