"""What a mapped patch does to model B's predictions.

A *mapped patch* runs model A on some texts, takes A's residual stream at a `source` point at
the aligned positions (the last token of every aligned chunk, see `tokens`), sends those rows
through an alignment map (any object with ``transform(X [n, d_A]) -> [n, d_B]``), casts them to
B's dtype and device and writes them into B's residual stream at a `target` point, at B's last
token of the same chunks. Every other position of B is untouched.

>>> eff = xa.effects.measure(pair, m, source="resid_post.10", target="resid_post.8", texts=texts,
...                          ablation_texts=held_out)
>>> eff.recovered, eff.kl, eff.top1_agreement
>>> g = xa.effects.grid(pair, {("resid_post.3", "resid_post.2"): m, ...}, texts, ablation_texts=held_out)
>>> print(xa.effects.table([eff, *g.effects.values()]).text)
>>> xa.generate(pair, m, "The capital of France is", source=..., target=..., ablation="zero")

Which predictions are evaluated (the same set for the clean, patched and ablated runs): in each
row of B's batch let ``p0`` be the first patched position (the last B token of the row's first
patched chunk). The predictions at positions ``t`` with ``p0 <= t`` whose label, the next token
``t + 1``, is a real token (attention mask 1) are scored; that leaves out BOS and everything
before ``p0`` (the patch cannot reach it: B is causal), the padding, and the row's final
position (it has no label). Rows without a patched position contribute nothing. With
``drop_first=k``, chunks that start within the first k text tokens on either side are not
patched (the same filter as `activations.collect`), which moves ``p0`` to the right.

Metrics, per evaluated prediction, averaged over all of them (sums accumulated in float64):
cross-entropy of the label under the clean, patched and ablated runs; KL(clean || patched) of
the next-token distributions; top-1 agreement (argmax patched == argmax clean). From those,
``recovered = (CE_ablated - CE_patched) / (CE_ablated - CE_clean)``: 1 means the patch is as
good as B's own activations, 0 as bad as the ablation. When ``|CE_ablated - CE_clean|`` is
below ``1e-6 * max(1, CE_clean)`` there is no gap to recover: `recovered` is NaN,
``Effect.recovered_undefined`` is True, ``Effect.note`` says why and a RuntimeWarning is issued.
When the ablation *lowers* B's loss (``CE_ablated < CE_clean``, as on random-init models),
`recovered` is still computed but its scale is inverted: `note` says so and a RuntimeWarning
is issued.

Ablation baselines at the same point and positions: ``"zero"`` writes zeros; ``"mean"`` writes
B's mean activation at `target` over the aligned positions (chunk-last tokens, same
`drop_first` filter) of held-out `ablation_texts`. Without `ablation_texts` the evaluation
texts are used and a UserWarning says the mean is not held out. A tensor ``[d_B]`` is used as
given (e.g. from `mean_activation`).

The *embedding-injection* baseline is a map whose target is B's ``"embed"`` point: A's layer-N
activations mapped into B's input-embedding space, then B runs from the start. It goes
through the same code and tables (``Effect.mode == "inject"``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .activations import filter_rows
from .patching import patch, patch_hooks
from .tokens import AlignedBatch

__all__ = [
    "ABLATIONS",
    "Effect",
    "EffectTable",
    "MappedPatch",
    "PatchGrid",
    "check_map",
    "generate",
    "grid",
    "mapped_patch",
    "mean_activation",
    "measure",
    "table",
]

ABLATIONS: tuple[str, ...] = ("mean", "zero")
_HALF = (torch.float16, torch.bfloat16)
_RECOVERED_RTOL = 1e-6


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _resolve(model: Any, point: Any, arg: str, side: str) -> str:
    """Canonical point name; the LensModel's ValueError (listing valid points) gets the argument."""
    try:
        return model.point(point).name
    except ValueError as e:
        raise ValueError(f"{arg}: model {side} ({model.name}): {e}") from e


def _is_map(m: Any) -> bool:
    """An instance with a transform method (a class with one is a fit function, see `grid`)."""
    return not isinstance(m, type) and callable(getattr(m, "transform", None))


def _fit_one(fn: Any, X: Tensor, Y: Tensor) -> Any:
    """Call a fit function: a map class (``cls().fit(X, Y)``) or ``fn(X, Y) -> map``."""
    if isinstance(fn, type) and callable(getattr(fn, "fit", None)):
        return fn().fit(X, Y)
    return fn(X, Y)


def _map_kind(m: Any) -> str:
    return str(getattr(m, "kind", "") or type(m).__name__)


def _canonical(model: Any, point: Any) -> Any:
    try:
        return model.point(point).name
    except (ValueError, TypeError):
        return point


def check_map(pair: Any, map: Any, source: str, target: str) -> tuple[str, str]:
    """Validate `map` for a patch from A's `source` to B's `target`; returns the canonical names.

    Checks: both points exist (ValueError listing the valid ones), the map has ``transform``,
    its declared widths (``d_in_`` / ``d_out_``, when it has them) equal A's / B's d_model, and
    its ``provenance`` (when it has one) names the same source and target points, model ids and
    config hashes as given here. Keys absent from the provenance are not checked.
    """
    a, b = pair.a, pair.b
    src = _resolve(a, source, "source", "A")
    tgt = _resolve(b, target, "target", "B")
    if not _is_map(map):
        what = f"the class {map.__name__}" if isinstance(map, type) else type(map).__name__
        raise TypeError(
            f"map must be a fitted object with a transform(X [n, d_A]) -> [n, d_B] method, got {what}"
        )
    for attr, model, side in (("d_in_", a, "A"), ("d_out_", b, "B")):
        width = getattr(map, attr, None)
        if isinstance(width, int) and width != model.d_model:
            what = "input" if attr == "d_in_" else "output"
            raise ValueError(
                f"map {what} width {attr}={width} does not match model {side} ({model.name}) "
                f"d_model={model.d_model}: the map was fit for another model"
            )
    prov = getattr(map, "provenance", None)
    if isinstance(prov, Mapping):
        expected: dict[str, tuple[Any, Any]] = {}
        if prov.get("source") is not None:
            expected["source"] = (src, _canonical(a, prov["source"]))
        if prov.get("target") is not None:
            expected["target"] = (tgt, _canonical(b, prov["target"]))
        for side, model in (("a", a), ("b", b)):
            for key, attr in (("model_id", "model_id"), ("config_hash", "config_hash")):
                k = f"{key}_{side}"
                if prov.get(k) is not None:
                    expected[k] = (getattr(model, attr), prov[k])
        wrong = [f"{k}: expected {e!r}, found {f!r}" for k, (e, f) in expected.items() if e != f]
        if wrong:
            raise ValueError(
                f"map provenance does not match this patch (A={a.name!r} {src} -> B={b.name!r} {tgt}): "
                + "; ".join(wrong)
                + ". Use the map fit for these points and models (or re-bind it with map.bind(...) "
                "if the mismatch is intended)"
            )
    return src, tgt


def _check_texts(texts: Any, name: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: pass at least one text")
    return texts


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# one batch: positions, mapped values, evaluated predictions
# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Positions of one aligned text batch: where to read A, where to write B, what to score."""

    ab: AlignedBatch
    ids_a: Tensor
    mask_a: Tensor
    ids_b: Tensor
    mask_b: Tensor
    rows_a: Tensor  # patched cells, A side (A's device)
    pos_a: Tensor
    rows_b: Tensor  # patched cells, B side (B's device)
    pos_b: Tensor
    eval_rows: Tensor  # evaluated predictions (B's device)
    eval_pos: Tensor
    labels: Tensor

    @property
    def n_patched(self) -> int:
        return int(self.rows_b.shape[0])

    @property
    def n_eval(self) -> int:
        return int(self.eval_rows.shape[0])


def _plan(pair: Any, ab: AlignedBatch, drop_first: int) -> _Plan:
    meta = ab.meta("last")
    keep, _ = filter_rows(meta, [], drop_first=drop_first)
    meta = meta.select(keep)
    a, b = pair.a, pair.b
    ins_a, ins_b = ab.model_inputs("a"), ab.model_inputs("b")
    ids_b, mask_b = ins_b["input_ids"].to(b.device), ins_b["attention_mask"].to(b.device)
    rows_b, pos_b = meta.row.to(b.device), meta.pos_b.to(b.device)
    n_rows, T = ids_b.shape
    first = torch.full((n_rows,), T, dtype=torch.long, device=b.device)
    first.scatter_reduce_(0, rows_b, pos_b, reduce="amin")
    t = torch.arange(T - 1, device=b.device)
    scored = (t[None, :] >= first[:, None]) & mask_b[:, 1:].bool()
    eval_rows, eval_pos = torch.nonzero(scored, as_tuple=True)
    return _Plan(
        ab=ab,
        ids_a=ins_a["input_ids"].to(a.device),
        mask_a=ins_a["attention_mask"].to(a.device),
        ids_b=ids_b,
        mask_b=mask_b,
        rows_a=meta.row.to(a.device),
        pos_a=meta.pos_a.to(a.device),
        rows_b=rows_b,
        pos_b=pos_b,
        eval_rows=eval_rows,
        eval_pos=eval_pos,
        labels=ids_b[eval_rows, eval_pos + 1],
    )


def _batches(
    pair: Any, texts: list[str], batch_size: int, drop_first: int, align_kw: dict, progress: bool, desc: str
) -> Iterator[_Plan]:
    kw = dict(align_kw)
    if kw.get("max_length") is None:
        kw["max_length"] = (pair.a.n_ctx, pair.b.n_ctx)
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        ab = pair.align(texts[s : s + batch_size], policy="last", **kw)
        yield _plan(pair, ab, drop_first)


def _source_rows(plan: _Plan, acts: Tensor, source: str, model: Any) -> Tensor:
    X = acts[plan.rows_a, plan.pos_a]
    if not torch.isfinite(X).all():
        raise ValueError(
            f"model A ({model.name}) has inf/NaN activations at {source!r} on the aligned positions; "
            "use a higher-precision dtype"
        )
    return X.float() if X.dtype in _HALF else X


def _apply_map(map: Any, X: Tensor, pair: Any, source: str, target: str) -> Tensor:
    """``map.transform(X)``, checked ([n, d_B], finite) and cast to B's dtype and device."""
    b = pair.b
    try:
        Y = map.transform(X)
    except RuntimeError as e:
        raise ValueError(
            f"map.transform failed on A's {source!r} rows of shape {tuple(X.shape)} "
            f"(A={pair.a.name!r}, d_model={pair.a.d_model}): {e}"
        ) from e
    if not isinstance(Y, Tensor):
        raise TypeError(f"map.transform must return a torch.Tensor, got {type(Y).__name__}")
    if Y.ndim != 2 or Y.shape[0] != X.shape[0] or Y.shape[1] != b.d_model:
        raise ValueError(
            f"map output has shape {tuple(Y.shape)} for {X.shape[0]} rows; model B ({b.name}) at "
            f"{target!r} needs [{X.shape[0]}, d_model={b.d_model}]"
        )
    if not torch.isfinite(Y).all():
        raise ValueError(f"map output for {source!r} -> {target!r} contains inf/NaN")
    return Y.to(device=b.device, dtype=b.dtype)


@dataclass
class MappedPatch:
    """A mapped patch of one aligned batch, ready to apply to B.

    `values` [n, d_B] (B's dtype/device) go to `target` at ``positions = (batch_idx, pos_b)``;
    `input_ids` / `attention_mask` are B's tokens of the batch.

    >>> mp = xa.effects.mapped_patch(pair, m, texts, source="resid_post.3", target="resid_post.2")
    >>> with mp.applied(pair.b):
    ...     logits = pair.b.forward(mp.input_ids, mp.attention_mask)
    """

    batch: AlignedBatch
    source: str
    target: str
    values: Float[Tensor, "n d_b"]
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    def hooks(self, model: Any) -> list[tuple[str, Callable]]:
        """(hook_name, fn) pairs for `run_with_hooks` (see `patching.patch_hooks`)."""
        return patch_hooks(model, self.target, self.values, self.positions)

    def applied(self, model: Any) -> contextlib.AbstractContextManager:
        """Context manager: forward passes of `model` (B) see the patch."""
        return patch(model, self.target, self.values, self.positions)


def mapped_patch(
    pair: Any,
    map: Any,
    texts: Sequence[str] | AlignedBatch,
    *,
    source: str,
    target: str,
    drop_first: int = 0,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
) -> MappedPatch:
    """Run A on `texts` (one batch) and map its `source` rows into B's `target` (see module doc)."""
    src, tgt = check_map(pair, map, source, target)
    _check_int(drop_first, "drop_first", 0)
    if isinstance(texts, AlignedBatch):
        plan = _plan(pair, texts, drop_first)
    else:
        texts = _check_texts(texts)
        plan = next(
            _batches(
                pair,
                texts,
                len(texts),
                drop_first,
                {"max_length": max_length, "overflow": overflow},
                False,
                "",
            )
        )
    with torch.no_grad():
        _, acts = pair.a.run_with_points(plan.ids_a, plan.mask_a, [src])
        Y = _apply_map(map, _source_rows(plan, acts[src], src, pair.a), pair, src, tgt)
    return MappedPatch(plan.ab, src, tgt, Y, (plan.rows_b, plan.pos_b), plan.ids_b, plan.mask_b)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """float64 sums of one variant's per-prediction metrics."""

    nll: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    n: int = 0

    def add(self, nll: Tensor, kl: Tensor, top1: Tensor) -> None:
        self.nll += float(nll.double().sum())
        self.kl += float(kl.double().sum())
        self.top1 += float(top1.double().sum())
        self.n += int(nll.shape[0])

    def mean(self, what: str) -> float:
        return getattr(self, what) / self.n if self.n else math.nan


class _Ref(NamedTuple):
    """The clean run at the evaluated predictions (the reference of KL and top-1)."""

    logits: Tensor  # [n, V] float32 (float64 for a float64 model)
    lse: Tensor  # [n] log-sum-exp of the logits
    p: Tensor  # [n, V] next-token probabilities
    psum: Tensor  # [n] sum of p (1 up to rounding)
    top: Tensor  # [n] argmax


def _select(logits: Tensor, plan: _Plan, j: int = 0) -> Tensor:
    """[n_eval, V] logits of replicate `j` (of a replicated batch) at the evaluated predictions."""
    B = plan.ids_b.shape[0]
    sel = logits[j * B : (j + 1) * B][plan.eval_rows, plan.eval_pos]
    return sel if sel.dtype == torch.float64 else sel.float()


def _reference(sel: Tensor) -> _Ref:
    lse = torch.logsumexp(sel, dim=-1)
    p = (sel - lse[:, None]).exp_()
    return _Ref(sel, lse, p, p.sum(-1), sel.argmax(-1))


def _score(sel: Tensor, plan: _Plan, ref: _Ref, acc: _Sums) -> None:
    """Add the metrics of one variant, ``sel`` [n, V] (see `_select`), to `acc`.

    CE = lse - logit[label]; KL(clean || variant) = sum_v p_v (lp_clean_v - lp_v)
    = (lse - lse_clean) * sum(p) - sum_v p_v (logit_v - logit_clean_v), computed on logit
    differences so that close distributions do not lose precision to cancellation.
    """
    lse = torch.logsumexp(sel, dim=-1)
    nll = lse - sel.gather(1, plan.labels[:, None]).squeeze(1)
    diff = sel - ref.logits
    kl = (lse - ref.lse) * ref.psum - diff.mul_(ref.p).sum(-1)
    acc.add(nll, kl, sel.argmax(-1) == ref.top)


def _recovered(ce_clean: float, ce_patched: float, ce_ablated: float, target: str) -> tuple[float, bool, str]:
    gap = ce_ablated - ce_clean
    tol = _RECOVERED_RTOL * max(1.0, abs(ce_clean))
    if not math.isfinite(gap) or abs(gap) <= tol:
        note = (
            f"recovered is undefined (NaN): the ablation at {target!r} does not change B's loss "
            f"(CE_ablated - CE_clean = {gap:.3g}, |gap| <= {tol:.1g}), so there is no loss gap to recover"
        )
        warnings.warn(note, RuntimeWarning, stacklevel=4)  # _recovered < _effect < measure/grid < caller
        return math.nan, True, note
    note = ""
    if gap < 0:
        note = (
            f"the ablation at {target!r} lowers B's loss (CE_ablated - CE_clean = {gap:.3g}), so "
            f"recovered's scale is inverted and it does not measure how good the patch is: compare "
            f"CE_patched, KL and top-1 directly"
        )
        warnings.warn(note, RuntimeWarning, stacklevel=4)
    return (ce_ablated - ce_patched) / gap, False, note


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclass
class Effect:
    """What a mapped patch from A's `source` to B's `target` does to B's next-token predictions.

    ce_clean / ce_patched / ce_ablated: mean next-token cross-entropy (nats) of B unpatched,
    patched, and ablated at the same point and positions. recovered: (CE_ablated - CE_patched) /
    (CE_ablated - CE_clean); NaN with ``recovered_undefined=True`` and a `note` when there is no
    gap. kl: mean KL(clean || patched) per evaluated prediction; top1_agreement: share of
    predictions whose argmax matches the clean run's; kl_ablated / top1_ablated: the same for the
    ablated run. n_tokens: evaluated predictions; n_patched: positions written; n_texts: texts.
    mode: "inject" for the embedding-injection baseline (target "embed"), else "patch".
    """

    source: str
    target: str
    map_kind: str
    ce_clean: float
    ce_patched: float
    ce_ablated: float
    recovered: float
    kl: float
    top1_agreement: float
    n_tokens: int
    n_patched: int
    ablation: str
    kl_ablated: float = math.nan
    top1_ablated: float = math.nan
    n_texts: int = 0
    drop_first: int = 0
    recovered_undefined: bool = False
    note: str = ""

    @property
    def mode(self) -> str:
        return "inject" if self.target == "embed" else "patch"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode": self.mode}


def _effect(
    src: str,
    tgt: str,
    kind: str,
    clean: _Sums,
    patched: _Sums,
    ablated: _Sums,
    n_patched: int,
    ablation: str,
    n_texts: int,
    drop_first: int,
) -> Effect:
    if clean.n == 0:
        raise ValueError(
            "no prediction to evaluate: every row's patched positions are at its end or were dropped "
            f"(drop_first={drop_first}); use longer texts or a smaller drop_first"
        )
    ce_c, ce_p, ce_a = clean.mean("nll"), patched.mean("nll"), ablated.mean("nll")
    rec, undefined, note = _recovered(ce_c, ce_p, ce_a, tgt)
    return Effect(
        source=src,
        target=tgt,
        map_kind=kind,
        ce_clean=ce_c,
        ce_patched=ce_p,
        ce_ablated=ce_a,
        recovered=rec,
        kl=patched.mean("kl"),
        top1_agreement=patched.mean("top1"),
        n_tokens=patched.n,
        n_patched=n_patched,
        ablation=ablation,
        kl_ablated=ablated.mean("kl"),
        top1_ablated=ablated.mean("top1"),
        n_texts=n_texts,
        drop_first=drop_first,
        recovered_undefined=undefined,
        note=note,
    )


class EffectTable(NamedTuple):
    """`text`: a plain-text table; `rows`: one dict per effect (same columns)."""

    text: str
    rows: list[dict[str, Any]]

    def __str__(self) -> str:
        return self.text


_COLUMNS = (
    ("source", "source"),
    ("target", "target"),
    ("mode", "mode"),
    ("map", "map_kind"),
    ("ablation", "ablation"),
    ("ce_clean", "ce_clean"),
    ("ce_patched", "ce_patched"),
    ("ce_ablated", "ce_ablated"),
    ("recovered", "recovered"),
    ("kl", "kl"),
    ("top1", "top1_agreement"),
    ("n_tokens", "n_tokens"),
    ("n_patched", "n_patched"),
)


def table(effects: Sequence[Effect] | Mapping[Any, Effect], *, digits: int = 4) -> EffectTable:
    """Render effects (mapped patches and embedding injections alike) as a plain-text table and a
    list of dicts. Undefined `recovered` values are marked ``nan*`` and explained under the table."""
    effs = list(effects.values()) if isinstance(effects, Mapping) else list(effects)
    for i, e in enumerate(effs):
        if not isinstance(e, Effect):
            raise TypeError(f"effects[{i}] must be an Effect, got {type(e).__name__}")
    rows = []
    for e in effs:
        d = e.as_dict()
        rows.append({col: d[key] for col, key in _COLUMNS} | {"note": e.note})
    cells = [[col for col, _ in _COLUMNS]]
    for e, r in zip(effs, rows, strict=True):
        line = []
        for col, _ in _COLUMNS:
            v = r[col]
            if isinstance(v, float):
                s = f"{v:.{digits}f}"
                if col == "recovered" and e.recovered_undefined:
                    s = "nan*"
            else:
                s = str(v)
            line.append(s)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    numeric = {col for col, key in _COLUMNS if key.startswith(("ce_", "recovered", "kl", "top1", "n_"))}
    lines = []
    for k, c in enumerate(cells):
        parts = [
            s.rjust(w) if (_COLUMNS[i][0] in numeric and k > 0) else s.ljust(w)
            for i, (s, w) in enumerate(zip(c, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({e.note for e in effs if e.note})
    lines += [f"* {n}" for n in notes]
    return EffectTable("\n".join(lines), rows)


# ------------------------------------------------------------------------------------------------
# ablation
# ------------------------------------------------------------------------------------------------


def mean_activation(
    pair: Any,
    target: str,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    drop_first: int = 0,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
) -> Float[Tensor, " d_b"]:
    """B's mean activation at `target` over the positions a mapped patch writes (the last B token
    of every aligned chunk, chunks filtered by `drop_first`) of `texts`; float64 sums, returned in
    B's dtype on B's device."""
    b = pair.b
    tgt = _resolve(b, target, "target", "B")
    texts = _check_texts(texts, "ablation_texts")
    total = torch.zeros(b.d_model, dtype=torch.float64, device=b.device)
    n = 0
    kw = {"max_length": max_length, "overflow": overflow}
    with torch.no_grad():
        for plan in _batches(pair, texts, batch_size, drop_first, kw, progress, "mean ablation"):
            if plan.n_patched == 0:
                continue
            _, acts = b.run_with_points(plan.ids_b, plan.mask_b, [tgt])
            rows = acts[tgt][plan.rows_b, plan.pos_b]
            if not torch.isfinite(rows).all():
                raise ValueError(f"model B ({b.name}) has inf/NaN activations at {tgt!r}")
            total += rows.double().sum(0)
            n += plan.n_patched
    if n == 0:
        raise ValueError(f"ablation_texts have no aligned position to average (drop_first={drop_first})")
    return (total / n).to(b.dtype)


def _ablation_vectors(
    pair: Any,
    targets: Sequence[str],
    ablation: str | Tensor,
    ablation_texts: Sequence[str] | None,
    texts: list[str],
    batch_size: int,
    drop_first: int,
    align_kw: dict,
) -> tuple[dict[str, Tensor], str]:
    """{target: [d_B] vector written by the ablation} and the ablation's name."""
    b = pair.b
    if isinstance(ablation, Tensor):
        if ablation.shape != (b.d_model,):
            raise ValueError(
                f"an ablation tensor must have shape [d_model] = [{b.d_model}] of model B, got {tuple(ablation.shape)}"
            )
        vec = ablation.to(device=b.device, dtype=b.dtype)
        if not torch.isfinite(vec).all():
            raise ValueError("the ablation tensor contains inf/NaN")
        return dict.fromkeys(targets, vec), "custom"
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} or a [d_model] tensor, got {ablation!r}")
    if ablation == "zero":
        return {t: torch.zeros(b.d_model, dtype=b.dtype, device=b.device) for t in targets}, "zero"
    if ablation_texts is None:
        warnings.warn(
            "ablation='mean' without ablation_texts: the mean activation is taken over the evaluation "
            "texts themselves, not held-out texts; pass ablation_texts=... for a held-out baseline",
            UserWarning,
            stacklevel=3,
        )
        ablation_texts = texts
    kw = {"batch_size": batch_size, "drop_first": drop_first, **align_kw}
    return {t: mean_activation(pair, t, ablation_texts, **kw) for t in targets}, "mean"


# ------------------------------------------------------------------------------------------------
# measure: one cell, plain forwards
# ------------------------------------------------------------------------------------------------


def measure(
    pair: Any,
    map: Any,
    *,
    source: str,
    target: str,
    texts: Sequence[str],
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
) -> Effect:
    """Effect of patching ``map(A[source])`` into B at `target` (see the module doc for exactly which
    predictions are scored and how the ablation baseline is built).

    Per batch of `texts`: one forward of A (stopped after `source`), then three of B: clean,
    ablated and patched, each through TransformerLens hooks (`patching.patch`).
    """
    src, tgt = check_map(pair, map, source, target)
    texts = _check_texts(texts)
    _check_int(batch_size, "batch_size", 1)
    _check_int(drop_first, "drop_first", 0)
    align_kw = {"max_length": max_length, "overflow": overflow}
    abl_vecs, abl_name = _ablation_vectors(
        pair, [tgt], ablation, ablation_texts, texts, batch_size, drop_first, align_kw
    )
    abl = abl_vecs[tgt]
    a, b = pair.a, pair.b
    clean, patched, ablated = _Sums(), _Sums(), _Sums()
    n_patched = 0
    with torch.no_grad():
        for plan in _batches(pair, texts, batch_size, drop_first, align_kw, progress, "measure"):
            if plan.n_patched == 0:
                continue
            _, acts = a.run_with_points(plan.ids_a, plan.mask_a, [src])
            Y = _apply_map(map, _source_rows(plan, acts[src], src, a), pair, src, tgt)
            del acts
            pos = (plan.rows_b, plan.pos_b)
            sel = _select(b.forward(plan.ids_b, plan.mask_b), plan)
            ref = _reference(sel)
            _score(sel, plan, ref, clean)
            with patch(b, tgt, abl.expand(plan.n_patched, -1), pos):
                _score(_select(b.forward(plan.ids_b, plan.mask_b), plan), plan, ref, ablated)
            with patch(b, tgt, Y, pos):
                _score(_select(b.forward(plan.ids_b, plan.mask_b), plan), plan, ref, patched)
            n_patched += plan.n_patched
    return _effect(
        src, tgt, _map_kind(map), clean, patched, ablated, n_patched, abl_name, len(texts), drop_first
    )


# ------------------------------------------------------------------------------------------------
# grid: many cells per batched forward
# ------------------------------------------------------------------------------------------------


@dataclass
class PatchGrid:
    """The functional heatmap: one mapped patch per (source point of A, target point of B).

    recovered / kl / top1 / ce_patched: float64 [n_sources, n_targets] (NaN where no map was
    given); ce_clean: B's clean loss (the same predictions for every cell); ce_ablated: per
    target; effects: the full `Effect` of every cell.
    """

    sources: list[str]
    targets: list[str]
    recovered: Float[Tensor, "s t"]
    kl: Float[Tensor, "s t"]
    top1: Float[Tensor, "s t"]
    ce_patched: Float[Tensor, "s t"]
    ce_clean: float
    ce_ablated: dict[str, float]
    effects: dict[tuple[str, str], Effect]
    n_tokens: int
    ablation: str
    model_a: str = "A"
    model_b: str = "B"
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self, digits: int = 4) -> EffectTable:
        return table(list(self.effects.values()), digits=digits)

    def values(self, metric: str = "recovered") -> Float[Tensor, "s t"]:
        if metric not in ("recovered", "kl", "top1", "ce_patched"):
            raise ValueError(f"metric must be 'recovered', 'kl', 'top1' or 'ce_patched', got {metric!r}")
        return getattr(self, metric)


def _fit_maps(
    pair: Any,
    cells: list[tuple[str, str]],
    fns: dict[tuple[str, str], Callable],
    fit_texts: Sequence[str] | None,
    batch_size: int,
    drop_first: int,
    align_kw: dict,
    progress: bool,
) -> dict[tuple[str, str], Any]:
    """Fit `fns[(s, t)](X, Y)` on paired rows of `fit_texts` (one streamed pass for all cells)."""
    if fit_texts is None:
        raise ValueError(
            "maps given as fit functions need fit_texts=... (texts to fit them on, distinct from the "
            "evaluation texts)"
        )
    from .activations import collect_all

    rows = collect_all(
        pair,
        _check_texts(fit_texts, "fit_texts"),
        list(dict.fromkeys(s for s, _ in fns)),
        list(dict.fromkeys(t for _, t in fns)),
        batch_size=batch_size,
        policy="last",
        drop_first=drop_first,
        progress=progress,
        **{k: v for k, v in align_kw.items() if v is not None},
    )
    X, Y = rows.a, rows.b
    fitted = {}
    for (s, t), fn in fns.items():
        m = _fit_one(fn, X[s], Y[t])
        if not _is_map(m):
            raise TypeError(f"the fit function for ({s}, {t}) returned {type(m).__name__}, not a map")
        from .maps import AlignmentMap

        if isinstance(m, AlignmentMap):
            m.bind(a=pair.a, b=pair.b, source=s, target=t, alignment="last")
        fitted[(s, t)] = m
    return fitted


def _cells(
    pair: Any,
    maps: Any,
    sources: Sequence[str] | None,
    targets: Sequence[str] | None,
) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    a, b = pair.a, pair.b
    if isinstance(maps, Mapping):
        if not maps:
            raise ValueError("maps is empty: give {(source, target): map}")
        entries = {}
        for key, m in maps.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"maps keys must be (source, target) tuples, got {key!r}")
            s, t = _resolve(a, key[0], "source", "A"), _resolve(b, key[1], "target", "B")
            if (s, t) in entries:
                raise ValueError(f"maps names the cell ({s}, {t}) twice")
            entries[(s, t)] = m
    elif callable(maps) and not _is_map(maps):
        if not sources or not targets:
            raise ValueError("with a fit function as maps, give sources=[...] and targets=[...]")
        entries = {
            (_resolve(a, s, "source", "A"), _resolve(b, t, "target", "B")): maps
            for s in sources
            for t in targets
        }
    else:
        raise TypeError(
            "maps must be a dict {(source, target): map or fit function} or a fit function "
            f"fit(X, Y) -> map, got {type(maps).__name__}"
        )
    order_a = {p: i for i, p in enumerate(a.points)}
    order_b = {p: i for i, p in enumerate(b.points)}
    srcs = (
        [_resolve(a, s, "source", "A") for s in sources]
        if sources
        else sorted({s for s, _ in entries}, key=order_a.__getitem__)
    )
    tgts = (
        [_resolve(b, t, "target", "B") for t in targets]
        if targets
        else sorted({t for _, t in entries}, key=order_b.__getitem__)
    )
    missing = [c for c in entries if c[0] not in srcs or c[1] not in tgts]
    if missing:
        raise ValueError(f"cells {missing} are outside sources={srcs} x targets={targets}")
    return srcs, tgts, entries


def grid(
    pair: Any,
    maps: Mapping[tuple[str, str], Any] | Callable,
    texts: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    fit_texts: Sequence[str] | None = None,
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    cells_per_forward: int = 8,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
) -> PatchGrid:
    """Effects of many mapped patches at once: the functional heatmap [sources x targets].

    maps: ``{(source, target): map}``; a value may instead be a fit function: a callable
    ``fit(X, Y) -> map`` or a map class (fit as ``cls().fit(X, Y)``, e.g. ``xa.maps.Procrustes``),
    fit on the paired rows (policy "last", same `drop_first`) of `fit_texts`, which are then
    required; `maps` itself may be one fit function used for every cell of ``sources x targets``.
    Fitted `AlignmentMap`s are bound to the pair and points (provenance).

    Per batch of texts, A runs once with hooks on every source point; then B's token batch is
    replicated K times along the batch dimension, one replicate per variant (the clean run, one
    ablated run per target, one patched run per cell), at most `cells_per_forward` replicates per
    forward. One hook per distinct target point writes only that point's replicates (positions
    as (batch_idx + replicate * batch, pos) cells). The numbers equal `measure` cell by cell.
    Memory: one forward holds the logits of ``cells_per_forward * batch_size`` rows (and the
    clean run's next-token probabilities at the evaluated predictions for the whole batch).

    Returns a `PatchGrid` (matrices ``recovered``, ``kl``, ``top1``, ``ce_patched`` with
    ``sources`` / ``targets`` as row / column names, and every cell's `Effect`).
    """
    texts = _check_texts(texts)
    _check_int(batch_size, "batch_size", 1)
    _check_int(drop_first, "drop_first", 0)
    _check_int(cells_per_forward, "cells_per_forward", 1)
    align_kw = {"max_length": max_length, "overflow": overflow}
    srcs, tgts, entries = _cells(pair, maps, sources, targets)
    fns = {c: m for c, m in entries.items() if not _is_map(m)}
    for c, m in fns.items():
        if not callable(m):
            raise TypeError(
                f"maps[{c}] must be a map (with transform) or a fit function, got {type(m).__name__}"
            )
    if fns:
        entries.update(
            _fit_maps(pair, list(entries), fns, fit_texts, batch_size, drop_first, align_kw, progress)
        )
    for (s, t), m in entries.items():
        check_map(pair, m, s, t)
    cells = [(s, t) for s in srcs for t in tgts if (s, t) in entries]
    used_srcs = list(dict.fromkeys(s for s, _ in cells))
    used_tgts = list(dict.fromkeys(t for _, t in cells))
    abl_vecs, abl_name = _ablation_vectors(
        pair, used_tgts, ablation, ablation_texts, texts, batch_size, drop_first, align_kw
    )
    a, b = pair.a, pair.b
    clean = _Sums()
    ablated = {t: _Sums() for t in used_tgts}
    patched = {c: _Sums() for c in cells}
    n_patched = 0
    n_forwards = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for plan in _batches(pair, texts, batch_size, drop_first, align_kw, progress, "grid"):
            if plan.n_patched == 0:
                continue
            _, acts = a.run_with_points(plan.ids_a, plan.mask_a, used_srcs)
            X = {s: _source_rows(plan, acts[s], s, a) for s in used_srcs}
            del acts
            # variants: (sums, target or None, values or the cell whose mapped values to compute);
            # mapped values are computed chunk by chunk, so memory holds one chunk's worth
            variants: list[tuple[_Sums, str | None, Any]] = [(clean, None, None)]
            variants += [(ablated[t], t, abl_vecs[t].expand(plan.n_patched, -1)) for t in used_tgts]
            variants += [(patched[c], c[1], c) for c in cells]
            ref: _Ref | None = None
            for k0 in range(0, len(variants), cells_per_forward):
                chunk = [
                    (sums, t, _apply_map(entries[v], X[v[0]], pair, *v) if isinstance(v, tuple) else v)
                    for sums, t, v in variants[k0 : k0 + cells_per_forward]
                ]
                logits = _replicated_forward(b, plan, [(t, v) for _, t, v in chunk])
                n_forwards += 1
                for j, (sums, _, _) in enumerate(chunk):
                    sel = _select(logits, plan, j)
                    if ref is None:  # the first replicate of the first chunk is the clean run
                        ref = _reference(sel)
                    _score(sel, plan, ref, sums)
                del logits
            n_patched += plan.n_patched
    seconds = time.perf_counter() - t0
    kind = {c: _map_kind(entries[c]) for c in cells}
    effects = {}
    for c in cells:  # a loop, not a comprehension: _recovered's warnings point at grid's caller
        effects[c] = _effect(
            c[0], c[1], kind[c], clean, patched[c], ablated[c[1]], n_patched, abl_name, len(texts), drop_first
        )
    S, T = len(srcs), len(tgts)
    mats = {
        k: torch.full((S, T), math.nan, dtype=torch.float64)
        for k in ("recovered", "kl", "top1", "ce_patched")
    }
    for (s, t), e in effects.items():
        i, j = srcs.index(s), tgts.index(t)
        mats["recovered"][i, j] = e.recovered
        mats["kl"][i, j] = e.kl
        mats["top1"][i, j] = e.top1_agreement
        mats["ce_patched"][i, j] = e.ce_patched
    return PatchGrid(
        sources=srcs,
        targets=tgts,
        ce_clean=clean.mean("nll"),
        ce_ablated={t: ablated[t].mean("nll") for t in used_tgts},
        effects=effects,
        n_tokens=clean.n,
        ablation=abl_name,
        model_a=a.name,
        model_b=b.name,
        extra={
            "n_patched": n_patched,
            "forwards_b": n_forwards,
            "cells_per_forward": cells_per_forward,
            "seconds": seconds,
            "drop_first": drop_first,
        },
        **mats,
    )


def _replicated_forward(model: Any, plan: _Plan, variants: list[tuple[str | None, Tensor | None]]) -> Tensor:
    """B's logits on ``len(variants)`` replicates of `plan`'s batch; replicate j patched at
    ``variants[j] = (target, values)`` (None: clean), one hook per distinct target."""
    k = len(variants)
    B = plan.ids_b.shape[0]
    by_target: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for j, (t, v) in enumerate(variants):
        if t is None:
            continue
        bi, pi, vs = by_target.setdefault(t, ([], [], []))
        bi.append(plan.rows_b + j * B)
        pi.append(plan.pos_b)
        vs.append(v)
    spec = {t: (torch.cat(vs), (torch.cat(bi), torch.cat(pi))) for t, (bi, pi, vs) in by_target.items()}
    hooks = patch_hooks(model, spec) if spec else []
    ids = plan.ids_b.repeat(k, 1)
    mask = plan.mask_b.repeat(k, 1)
    return model.forward(ids, mask, fwd_hooks=hooks)


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


def generate(
    pair: Any,
    map: Any,
    prompt: str,
    *,
    source: str,
    target: str,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    drop_first: int = 0,
) -> dict[str, Any]:
    """B's continuation of `prompt` clean, under the mapped patch, and under the ablation.

    The patch (and the ablation) are written at the prompt's aligned positions only; generated
    tokens are not patched. Each step re-runs B's full forward on [clean, patched, ablated] rows
    (no KV cache: quadratic in length, fine for short generations). Greedy by default; with
    ``do_sample=True`` each row samples from ``softmax(logits / temperature)`` with its own
    generator seeded with `seed`, so rows with equal distributions draw the same tokens.
    Generation of a row stops at B's EOS token (not included in the text).

    Returns {"prompt", "clean", "patched", "ablated" (decoded continuations), "tokens" (their
    token ids), "source", "target", "ablation", "n_patched"}.
    """
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"prompt must be a non-empty str, got {prompt!r}")
    _check_int(max_new_tokens, "max_new_tokens", 0)
    if do_sample and not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    src, tgt = check_map(pair, map, source, target)
    b = pair.b
    mp = mapped_patch(pair, map, [prompt], source=src, target=tgt, drop_first=drop_first)
    n = int(mp.values.shape[0])
    if n == 0:
        raise ValueError(f"the prompt has no aligned position to patch (drop_first={drop_first})")
    abl_vecs, abl_name = _ablation_vectors(pair, [tgt], ablation, ablation_texts, [prompt], 8, drop_first, {})
    _, pos = mp.positions
    values = torch.cat([mp.values, abl_vecs[tgt].expand(n, -1)])
    rows = torch.cat([torch.full_like(pos, 1), torch.full_like(pos, 2)])
    hooks = patch_hooks(b, tgt, values, (rows, torch.cat([pos, pos])))
    ids = mp.input_ids[:1, : int(mp.attention_mask[0].sum())].repeat(3, 1)
    prompt_len = ids.shape[1]
    eos = b.tokenizer.eos_token_id
    gens = [torch.Generator().manual_seed(int(seed)) for _ in range(3)]
    done = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = b.forward(ids, None, fwd_hooks=hooks)[:, -1].float().cpu()
            if do_sample:
                probs = torch.softmax(logits / float(temperature), dim=-1)
                nxt = torch.cat([torch.multinomial(probs[r], 1, generator=gens[r]) for r in range(3)])
            else:
                nxt = logits.argmax(-1)
            ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    out_tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    for r, name in enumerate(("clean", "patched", "ablated")):
        new = ids[r, prompt_len:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        out_tokens[name] = new
        texts[name] = b.tokenizer.decode(new, skip_special_tokens=True)
    return {
        "prompt": prompt,
        **texts,
        "tokens": out_tokens,
        "source": src,
        "target": tgt,
        "ablation": abl_name,
        "n_patched": n,
    }
