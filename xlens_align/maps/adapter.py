"""An alignment map trained through model B's next-token loss (a stitching adapter).

The closed-form maps fit B's activations; what matters is what B *does* with the mapped
activation. `train_adapter` trains an affine (or MLP) map from A's `source` point to B's
`target` point with B's own loss, the patch in place:

1. A's activations at `source` are collected once per batch of texts (no grad; the usual
   `activations.collect` filters apply) at the aligned chunk ends (policy ``"last"``);
2. at every step the adapter maps them, and a TransformerLens hook on ``pair.b.bridge`` writes
   the result into B's residual stream at `target`, at the same chunks' last B positions
   ``(batch_idx, pos_b)``;
3. B runs to its logits with explicit ``position_ids`` (when its HF forward takes them; else HF's
   default ``arange``, the same for the right-padded rows used here), and the loss is B's
   cross-entropy on the next tokens (``objective="ce"``; labels of padding are -100, so pad ids
   never matter) or ``KL(clean B || patched B)`` on the same positions (``objective="kl"``);
4. B's parameters are frozen (``requires_grad=False`` during training, restored afterwards): the
   only graph built runs from the patched activation through B's later layers into the adapter.

The adapter works in standardized coordinates (``z = (x - mean_x) / std_x``, output
``y = u * std_y + mean_y``, means and stds from the training rows), so one learning rate fits
any pair of models. It starts from random weights (``init=None``), from a closed-form map fitted
on the same rows (``"affine"``: ridge with cross-validated alpha; ``"procrustes"``: scaled
orthogonal), or from a given fitted map (a linear map, an `MLP` for ``kind="mlp"``, or another
`Adapter`, to continue training). Early stopping on `val_texts`: the held-out loss is checked
every `val_every` steps (default: once per pass over the training batches); training stops after
`patience` checks without improvement and the best weights are restored.

The hooks live in a context manager that removes them on exit, error or not; the parameter flags
are restored in a ``finally`` too.

>>> ad = train_adapter(pair, source="resid_post.10", target="resid_post.8", texts=train,
...                    val_texts=held_out, init="affine", steps=300)
>>> ad.history_[-1], ad.transform(X)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from xlens_align.maps.base import AlignmentMap, register
from xlens_align.maps.linear import Affine, Procrustes
from xlens_align.maps.mlp import ACTIVATIONS, MLP, ResidualMLP
from xlens_align.maps.preprocess import Preprocessor
from xlens_align.stats import CrossStats

__all__ = ["OBJECTIVES", "Adapter", "patched_loss", "train_adapter"]

OBJECTIVES = ("ce", "kl")
KINDS = ("affine", "mlp")
_INITS = (None, "affine", "procrustes")


# -- B's loss under a patch ------------------------------------------------------------------------
@dataclass
class _Rows:
    """One training batch: B's tokens and the patched cells, with A's activations there."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    rows: Tensor  # batch row of each patched cell
    pos_b: Tensor  # B position of each patched cell
    x: Tensor  # [n, d_A] float32, A's source activations (no grad)
    y: Tensor | None  # [n, d_B] B's clean target activations (only kept for the init fit)


def _accepts_position_ids(model: Any) -> bool:
    try:
        params = inspect.signature(model.hf_model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token labels [B, T-1]: ``input_ids[:, 1:]``, -100 where the next token is padding."""
    labels = input_ids[:, 1:].clone()
    labels[attention_mask[:, 1:] == 0] = -100
    return labels


def _logits(model: Any, batch: _Rows, hooks: list | None = None) -> Tensor:
    kw: dict[str, Any] = {"attention_mask": batch.attention_mask}
    if _accepts_position_ids(model):
        kw["position_ids"] = batch.position_ids
    if hooks:
        with model.bridge.hooks(fwd_hooks=hooks):
            return model.bridge(batch.input_ids, return_type="logits", **kw)
    return model.bridge(batch.input_ids, return_type="logits", **kw)


def _loss_sum(model: Any, target: str, batch: _Rows, values: Tensor, objective: str) -> tuple[Tensor, int]:
    """(sum over scored positions, number of positions) of B's objective with `values` patched in."""
    from xlens_align.patching import patch_hooks

    labels = _labels(batch.input_ids, batch.attention_mask)
    valid = labels != -100
    count = int(valid.sum())
    values = values.to(device=model.device, dtype=model.dtype)
    hooks = patch_hooks(model, target, values, positions=(batch.rows, batch.pos_b))
    logits = _logits(model, batch, hooks)[:, :-1][valid].float()
    if objective == "ce":
        return F.cross_entropy(logits, labels[valid], reduction="sum"), count
    with torch.no_grad():
        clean = _logits(model, batch)[:, :-1][valid].float().log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), clean, log_target=True, reduction="none").sum(-1)
    return kl.sum(), count


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def patched_loss(
    pair: Any,
    m: Any,
    batch: Any,
    source: str,
    target: str,
    *,
    objective: str = "ce",
    drop_first: int = 0,
) -> float:
    """B's mean next-token loss on an `AlignedBatch` with `m` patched from A's `source` into B's
    `target` at the chunk ends (policy ``"last"``, chunks starting within the first `drop_first`
    text tokens left alone). `m`: any object with ``transform``. ``objective="ce"``: cross-entropy
    (padding labels ignored); ``"kl"``: KL(clean B || patched B) per scored position."""
    _check_objective(objective)
    rows = _rows_of(pair, batch, source, drop_first)
    if rows is None:
        raise ValueError("no aligned position is left to patch in this batch")
    with torch.no_grad():
        total, n = _loss_sum(pair.b, pair.b.point(target).name, rows, m.transform(rows.x), objective)
    return float(total) / max(n, 1)


def _rows_of(pair: Any, ab: Any, source: str, drop_first: int) -> _Rows | None:
    """`_Rows` of an `AlignedBatch` (A run once, no grad), or None when no cell remains."""
    meta = ab.meta("last")
    keep = meta.mask(min_position=drop_first + 1) if drop_first else torch.ones(len(meta), dtype=torch.bool)
    if not bool(keep.any()):
        return None
    inp = ab.model_inputs("a")
    with torch.no_grad():
        _, acts = pair.a.run_with_points(
            inp["input_ids"].to(pair.a.device), inp["attention_mask"].to(pair.a.device), [source]
        )
    x = ab.gather_side(acts[source], "a", "last").float()[keep.to(pair.a.device)]
    return _make_rows(pair.b, ab, meta.row[keep], meta.pos_b[keep], x, None)


def _make_rows(model: Any, ab: Any, rows: Tensor, pos_b: Tensor, x: Tensor, y: Tensor | None) -> _Rows:
    inp = ab.model_inputs("b")
    dev = model.device
    return _Rows(
        input_ids=inp["input_ids"].to(dev),
        attention_mask=inp["attention_mask"].to(dev),
        position_ids=inp["position_ids"].to(dev),
        rows=rows.to(dev),
        pos_b=pos_b.to(dev),
        x=x,
        y=y,
    )


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` get ``requires_grad=False`` inside; the flags are restored after."""
    seen: dict[int, tuple[nn.Parameter, bool]] = {}
    for mod in modules:
        for p in mod.parameters():
            seen.setdefault(id(p), (p, p.requires_grad))
    try:
        for p, _ in seen.values():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in seen.values():
            p.requires_grad_(flag)


# -- the adapter ------------------------------------------------------------------------------------
@register("adapter")
class Adapter(AlignmentMap):
    """Affine or MLP map from A's `source` to B's `target`, trained through B's next-token loss.

    ``y = inverse_y(net(forward_x(x)))`` with standardizing preprocessors ``prep_x_``/``prep_y_``
    and ``net_`` an ``nn.Linear`` (``arch="affine"``) or a `ResidualMLP` (``arch="mlp"``: linear
    skip plus `depth` hidden layers of width `hidden`, head starting at zero). Train it with
    `fit_pair` (or `train_adapter`); `fit(X, Y)` on tensors is refused, since the loss needs B.

    Hyper-parameters: ``objective`` (``"ce"`` or ``"kl"``), ``steps`` (optimizer steps, one batch
    each), ``lr``, ``weight_decay`` (AdamW), ``batch_size`` (texts per batch), ``patience`` and
    ``min_delta`` (early stopping on validation checks), ``val_every`` (steps between checks;
    None = once per pass over the training batches), ``seed``, ``progress``.

    Fitted: ``net_``, ``prep_x_``, ``prep_y_``, ``history_`` (dicts with ``step``,
    ``train_loss``, ``val_loss``; the step-0 entry is the init's loss over the whole training
    and validation sets, later ``train_loss`` entries average the steps since the last check),
    ``init_`` (what it started from), ``init_train_loss_``/``final_train_loss_`` (whole training
    set, no grad, before / after training), ``init_val_loss_``, ``best_val_loss_``, ``best_step_``,
    ``stopped_early_``, ``clean_loss_`` (B's own cross-entropy on the evaluation texts; 0 for
    ``"kl"``), ``position_ids_`` (whether explicit position ids reached B), ``d_in_``, ``d_out_``,
    ``n_samples_`` (patched training positions).
    """

    def __init__(
        self,
        arch: str = "affine",
        *,
        objective: str = "ce",
        hidden: int = 256,
        depth: int = 1,
        activation: str = "gelu",
        steps: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 8,
        patience: int = 3,
        min_delta: float = 1e-4,
        val_every: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.arch = arch
        self.objective = objective
        self.hidden = hidden
        self.depth = depth
        self.activation = activation
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.min_delta = min_delta
        self.val_every = val_every
        self.seed = seed
        self.progress = progress

    # -- checks -------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.arch not in KINDS:
            raise ValueError(f"arch (train_adapter's kind) must be one of {KINDS}, got {self.arch!r}")
        _check_objective(self.objective)
        for name in ("hidden", "depth", "steps", "batch_size", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.val_every is not None and (
            isinstance(self.val_every, bool) or not isinstance(self.val_every, int) or self.val_every < 1
        ):
            raise ValueError(f"val_every must be None or a positive int, got {self.val_every!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a float > 0, got {self.lr!r}")
        for name in ("weight_decay", "min_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int | float) and v >= 0):
                raise ValueError(f"{name} must be a float >= 0, got {v!r}")

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        raise TypeError(
            "an Adapter is trained through model B's next-token loss, not on (X, Y) pairs: use "
            "train_adapter(pair, source=..., target=..., texts=...) or Adapter(...).fit_pair(pair, ...)"
        )

    # -- the network ----------------------------------------------------------------------------
    def _new_net(self, d_in: int, d_out: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            if self.arch == "affine":
                return nn.Linear(d_in, d_out)
            return ResidualMLP(d_in, d_out, self.hidden, self.depth, self.activation)

    def _linear_part(self) -> nn.Linear:
        return self.net_ if isinstance(self.net_, nn.Linear) else self.net_.skip

    def _build_module(self, name: str) -> nn.Module:
        if name != "net_":
            return super()._build_module(name)
        return self._new_net(self.d_in_, self.d_out_)

    def _apply(self, x: Tensor) -> Tensor:
        """Differentiable map of float32 rows on the net's device."""
        z = self.prep_x_.forward(x)
        return self.prep_y_.inverse(self.net_(z))

    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        dev = next(self.net_.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, X.shape[0], 16384):
                z = self.prep_x_.forward(X[i : i + 16384].double()).float().to(dev)
                out.append(self.prep_y_.inverse(self.net_(z).double().to(X.device)))
        return torch.cat(out)

    # -- initialisation -------------------------------------------------------------------------
    def _init_from(self, init: Any, X: Tensor, Y: Tensor) -> None:
        """Set ``prep_x_``, ``prep_y_``, ``net_`` and ``init_`` from `init` and the training rows."""
        d_in, d_out = X.shape[1], Y.shape[1]
        if isinstance(init, Adapter):
            init._check_fitted()
            if init.arch != self.arch or (init.d_in_, init.d_out_) != (d_in, d_out):
                raise ValueError(
                    f"init Adapter is arch={init.arch!r} [{init.d_in_} -> {init.d_out_}], this one is "
                    f"arch={self.arch!r} [{d_in} -> {d_out}]"
                )
            if self.arch == "mlp" and (init.hidden, init.depth, init.activation) != (
                self.hidden,
                self.depth,
                self.activation,
            ):
                raise ValueError("init Adapter has a different MLP architecture (hidden, depth, activation)")
            self.prep_x_, self.prep_y_ = _copy_prep(init.prep_x_), _copy_prep(init.prep_y_)
            self.net_ = copy.deepcopy(init.net_)
            self.init_ = "adapter"
            return
        if isinstance(init, MLP):
            init._check_fitted()
            if self.arch != "mlp":
                raise TypeError("an MLP map can only initialise arch='mlp' adapters")
            if (init.d_in_, init.d_out_) != (d_in, d_out) or (init.hidden, init.depth, init.activation) != (
                self.hidden,
                self.depth,
                self.activation,
            ):
                raise ValueError("init MLP has other dimensions or architecture (hidden, depth, activation)")
            self.prep_x_, self.prep_y_ = _copy_prep(init.prep_x_), _copy_prep(init.prep_y_)
            self.net_ = copy.deepcopy(init.net_)
            self.init_ = "mlp"
            return
        label = "random" if init is None else init
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(f"init must be None, 'affine', 'procrustes' or a fitted map, got {init!r}")
            init = Affine(alpha="cv").fit(X, Y) if init == "affine" else Procrustes(scale=True).fit(X, Y)
        elif init is not None:
            if not isinstance(init, AlignmentMap):
                raise TypeError(
                    f"init must be None, 'affine', 'procrustes' or a fitted AlignmentMap, got {type(init).__name__}"
                )
            init._check_fitted()
            if not (
                isinstance(getattr(init, "weight_", None), Tensor)
                and isinstance(getattr(init, "bias_", None), Tensor)
            ):
                raise TypeError(
                    f"init {type(init).__name__} is not a linear map (weight_, bias_); give a linear map, an MLP "
                    "(kind='mlp') or an Adapter"
                )
            if (init.d_in_, init.d_out_) != (d_in, d_out):
                raise ValueError(
                    f"init map is [{init.d_in_} -> {init.d_out_}], the points are [{d_in} -> {d_out}]"
                )
            label = f"map:{init.kind}"
        px = Preprocessor(center=True, mode="standardize")
        py = Preprocessor(center=True, mode="standardize")
        prep_in = getattr(init, "prep_x_", None)
        if isinstance(prep_in, Preprocessor) and prep_in.clamp_lo is not None:
            px.set_clamp(prep_in.clamp_lo, prep_in.clamp_hi, d_in)
        st = CrossStats.empty(d_in, d_out)
        for i in range(0, X.shape[0], 16384):
            st.update(px.clamp(X[i : i + 16384].double()).cpu(), Y[i : i + 16384].cpu())
        px.fit_moments(st.x)
        py.fit_moments(st.y)
        net = self._new_net(d_in, d_out)
        if init is not None:
            # y = clamp(x) W + b  ->  u = z (diag(s_x) W diag(1/s_y)) + (o_x W + b - o_y) / s_y
            W, b = init.weight_.double().cpu(), init.bias_.double().cpu()
            w_std = px.scale[:, None] * W / py.scale[None, :]
            b_std = (px.offset @ W + b - py.offset) / py.scale
            lin = net if isinstance(net, nn.Linear) else net.skip
            with torch.no_grad():
                lin.weight.copy_(w_std.T.float())
                lin.bias.copy_(b_std.float())
        self.prep_x_, self.prep_y_, self.net_ = px, py, net
        self.init_ = label

    # -- training -------------------------------------------------------------------------------
    def fit_pair(
        self,
        pair: Any,
        source: str,
        target: str,
        texts: Sequence[str],
        val_texts: Sequence[str] | None = None,
        init: Any = None,
        **collect_kw: Any,
    ) -> Adapter:
        """Train on `pair` from A's `source` to B's `target` over `texts`; returns self.

        `collect_kw` go to `activations.collect` (``drop_first``, ``outlier_factor``, ``clamp``,
        ``max_length``, ``overflow``): they choose which aligned positions are patched. The policy
        is always ``"last"``. Provenance (models, points, filters) is bound afterwards.
        """
        from xlens_align.activations import collect
        from xlens_align.maps.grid import provenance

        self._check_params()
        if not (hasattr(pair, "a") and hasattr(pair, "b")):
            raise TypeError(f"pair must be a ModelPair, got {type(pair).__name__}")
        if collect_kw.get("policy", "last") != "last":
            raise ValueError("an adapter patches each chunk's last token: policy must be 'last'")
        for k in ("batch_size", "progress"):
            if k in collect_kw:
                raise TypeError(f"{k} is a hyper-parameter of the Adapter, not a collect option")
        src, tgt = pair.a.point(source).name, pair.b.point(target).name
        kw = {**collect_kw, "policy": "last", "batch_size": self.batch_size, "progress": False}

        def batches(txts: Sequence[str], keep_y: bool) -> list[_Rows]:
            out = []
            for pb in collect(pair, txts, [src], [tgt], **kw):
                if pb.n:
                    y = pb.b[tgt] if keep_y else None
                    out.append(_make_rows(pair.b, pb.batch, pb.meta.row, pb.meta.pos_b, pb.a[src], y))
            return out

        train = batches(texts, keep_y=True)
        if not train:
            raise ValueError("no aligned position is left to patch in `texts` (all rows filtered?)")
        val = batches(val_texts, keep_y=False) if val_texts is not None else []
        if val_texts is not None and not val:
            raise ValueError("no aligned position is left to patch in `val_texts` (all rows filtered?)")
        X = torch.cat([r.x.cpu() for r in train])
        Y = torch.cat([r.y.cpu() for r in train])
        for r in train:
            r.y = None
        self._init_from(init, X, Y)
        self.d_in_, self.d_out_ = int(X.shape[1]), int(Y.shape[1])
        self.n_samples_ = int(X.shape[0])
        del X, Y
        dev = pair.b.device
        self.net_ = self.net_.to(dev)
        self.position_ids_ = _accepts_position_ids(pair.b)
        with _frozen(pair.b.bridge, pair.b.hf_model, pair.a.bridge, pair.a.hf_model):
            self._train(pair.b, tgt, train, val)
        self.bind(a=pair.a, b=pair.b, **provenance(pair, src, tgt, **kw), objective=self.objective)
        return self

    def _batch_loss(self, model: Any, target: str, batch: _Rows) -> tuple[Tensor, int]:
        values = self._apply(batch.x.to(model.device).float())
        return _loss_sum(model, target, batch, values, self.objective)

    def _evaluate(self, model: Any, target: str, data: list[_Rows]) -> float:
        self.net_.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data:
                s, n = self._batch_loss(model, target, batch)
                total += float(s)
                count += n
        return total / max(count, 1)

    def _clean_loss(self, model: Any, data: list[_Rows]) -> float:
        if self.objective == "kl":
            return 0.0
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data:
                labels = _labels(batch.input_ids, batch.attention_mask)
                valid = labels != -100
                logits = _logits(model, batch)[:, :-1][valid].float()
                total += float(F.cross_entropy(logits, labels[valid], reduction="sum"))
                count += int(valid.sum())
        return total / max(count, 1)

    def _train(self, model: Any, target: str, train: list[_Rows], val: list[_Rows]) -> None:
        net = self.net_
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(int(self.seed))
        val_every = self.val_every or len(train)
        has_val = bool(val)

        self.init_train_loss_ = self._evaluate(model, target, train)
        self.init_val_loss_ = self._evaluate(model, target, val) if has_val else None
        self.clean_loss_ = self._clean_loss(model, val if has_val else train)
        self.history_: list[dict[str, Any]] = [
            {"step": 0, "train_loss": self.init_train_loss_, "val_loss": self.init_val_loss_}
        ]
        best = self.init_val_loss_
        best_state = copy.deepcopy(net.state_dict())
        self.best_step_, self.best_val_loss_ = 0, best
        self.stopped_early_ = False
        bad, run, cnt = 0, 0.0, 0
        order: list[int] = []
        bar = tqdm(total=self.steps, desc="adapter", disable=not self.progress, leave=False)
        try:
            for step in range(1, self.steps + 1):
                if not order:
                    order = torch.randperm(len(train), generator=gen).tolist()
                batch = train[order.pop()]
                net.train()
                opt.zero_grad(set_to_none=True)
                total, n = self._batch_loss(model, target, batch)
                loss = total / max(n, 1)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"adapter training diverged at step {step} (loss {float(loss)}); lower lr"
                    )
                loss.backward()
                opt.step()
                run += float(total.detach())
                cnt += n
                bar.update(1)
                if step % val_every and step != self.steps:
                    continue
                entry: dict[str, Any] = {"step": step, "train_loss": run / max(cnt, 1), "val_loss": None}
                run, cnt = 0.0, 0
                if has_val:
                    v = self._evaluate(model, target, val)
                    entry["val_loss"] = v
                    if v < best - self.min_delta * abs(best):
                        best, bad = v, 0
                        best_state = copy.deepcopy(net.state_dict())
                        self.best_step_, self.best_val_loss_ = step, v
                    else:
                        bad += 1
                    bar.set_postfix(val=f"{best:.4g}")
                self.history_.append(entry)
                if has_val and bad >= self.patience:
                    self.stopped_early_ = True
                    break
        finally:
            bar.close()
        if has_val:
            net.load_state_dict(best_state)
        else:
            self.best_step_ = self.history_[-1]["step"]
        net.eval()
        self.final_train_loss_ = self._evaluate(model, target, train)


def _copy_prep(p: Preprocessor) -> Preprocessor:
    tensors, cfg = p.state()
    return Preprocessor.from_state({k: v.clone() for k, v in tensors.items()}, cfg)


def train_adapter(
    pair: Any,
    source: str,
    target: str,
    texts: Sequence[str],
    *,
    init: Any = None,
    kind: str = "affine",
    objective: str = "ce",
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    val_texts: Sequence[str] | None = None,
    patience: int = 3,
    seed: int = 0,
    progress: bool = False,
    **kw: Any,
) -> Adapter:
    """Train an `Adapter` from A's `source` to B's `target` through B's next-token loss.

    Args:
        pair: a `ModelPair` (B's weights are frozen during training and left unchanged).
        source, target: point names of A and B.
        texts: training texts; val_texts: held-out texts for early stopping (None: run all steps).
        init: None (random), ``"affine"`` / ``"procrustes"`` (closed form fitted on the same
            rows), or a fitted map (linear, `MLP` for ``kind="mlp"``, or an `Adapter`).
        kind: ``"affine"`` or ``"mlp"``; objective: ``"ce"`` or ``"kl"``.
        steps, lr, batch_size (texts per step), patience, seed, progress: training settings.
        **kw: other `Adapter` hyper-parameters (``hidden``, ``depth``, ``activation``,
            ``weight_decay``, ``min_delta``, ``val_every``) and `collect` options choosing the
            patched positions (``drop_first``, ``outlier_factor``, ``clamp``, ``max_length``,
            ``overflow``).
    """
    names = set(Adapter._param_names())
    hyper = {k: v for k, v in kw.items() if k in names}
    collect_kw = {k: v for k, v in kw.items() if k not in names}
    ad = Adapter(
        kind,  # the constructor calls it `arch`: `kind` is every map's registry key
        objective=objective,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
        progress=progress,
        **hyper,
    )
    return ad.fit_pair(pair, source, target, texts, val_texts=val_texts, init=init, **collect_kw)
