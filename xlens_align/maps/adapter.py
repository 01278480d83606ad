"""A stitching adapter: an affine or MLP map trained by gradient descent on any objective.

The closed-form maps fit B's activations; what matters is what B *does* with the mapped
activation. The `Adapter` is the estimator that can be trained on that: given paired rows
(X = A's source activations, Y = B's target activations, which set its standardisation and its
initial map) it minimises

- ``objective="mse"``: the mean squared error in standardised coordinates on the rows themselves
  (minibatches of `batch_size` rows; `val_fraction` of the rows held out for early stopping), so
  ``Adapter().fit(X, Y)`` is an ordinary estimator on tensors;
- ``objective="ce"`` / ``"kl"``: a loss the caller computes, typically B's next-token loss with
  the mapped activation patched into B: ``fit(X, Y, loss=..., batches=..., val_batches=...)``.
  Each batch is an opaque object with ``.x`` (A's rows [n_i, d_A], float32, on the net's device);
  at each step one batch is drawn (seeded order) and ``loss(apply, batch) -> (total, count)`` is
  called with ``apply(x) -> [n, d_B]`` the differentiable map; the step minimises
  ``total / count``. `xlens_align.fitting.train_adapter` builds those batches and that loss from
  a `ModelPair`; this module never runs a model.

The adapter works in standardized coordinates (``z = (x - mean_x) / std_x``, output
``y = u * std_y + mean_y``, means and stds from X, Y), so one learning rate fits any pair of
models. It starts from random weights (``init=None``), from a closed-form map fitted on X, Y
(``"affine"``: ridge with cross-validated alpha; ``"procrustes"``: scaled orthogonal), or from a
given fitted map (a linear map, an `MLP` for ``base="mlp"``, or another `Adapter`, to continue
training). Training is `maps.training.train` (AdamW, early stopping, best weights restored).

>>> ad = Adapter("mlp", hidden=64, steps=500).fit(X, Y)            # objective="mse"
>>> ad = Adapter(objective="ce", steps=300).fit(X, Y, loss=b_loss, batches=train, val_batches=val)
>>> ad.history_[-1], ad.transform(X)
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from xlens_align.files import split_indices
from xlens_align.maps import training
from xlens_align.maps.base import AlignmentMap, register
from xlens_align.maps.linear import Affine, Procrustes
from xlens_align.maps.mlp import MLP, NetMap, ResidualMLP, check_net_params, prepared_rows
from xlens_align.maps.preprocess import Preprocessor
from xlens_align.stats import CrossStats
from xlens_align.validate import check_pair

__all__ = ["BASES", "OBJECTIVES", "Adapter"]

OBJECTIVES = ("mse", "ce", "kl")
BASES = ("affine", "mlp")
_INITS = (None, "affine", "procrustes")

Apply = Callable[[Tensor], Tensor]
BatchLoss = Callable[[Apply, Any], tuple[Tensor, int]]


@register("adapter")
class Adapter(NetMap):
    """Affine or MLP map trained by AdamW on ``objective`` (see the module docstring).

    ``y = prep_y_.inverse(net_(prep_x_.forward(x)))`` with standardizing preprocessors and
    ``net_`` an ``nn.Linear`` (``base="affine"``) or a `ResidualMLP` (``base="mlp"``: linear skip
    plus `depth` hidden layers of width `hidden`, head starting at zero).

    Hyper-parameters: ``objective`` (``"mse"``, ``"ce"`` or ``"kl"``; saved with the map),
    ``init``, ``steps`` (optimizer steps), ``lr``, ``weight_decay``, ``batch_size`` (rows per
    step for ``"mse"``; ce / kl batches are given), ``patience`` and ``min_delta`` (early
    stopping), ``val_every`` (steps between validation checks; None = once per pass over the
    training batches), ``val_fraction`` (rows held out for ``"mse"``), ``seed``, ``progress``.

    Fitted: ``net_``, ``prep_x_``, ``prep_y_``, ``history_`` (dicts with ``epoch``, ``step``,
    ``train_loss``, ``val_loss``; the step-0 entry holds the init's loss over all training and
    validation batches, later ``train_loss`` entries average the steps since the last check),
    ``init_`` (what it started from), ``init_train_loss_`` / ``final_train_loss_`` (all training
    batches, no grad, before / after training), ``init_val_loss_``, ``best_val_loss_`` (None
    without validation), ``best_step_``, ``stopped_early_``, ``d_in_``, ``d_out_``,
    ``n_samples_`` (rows of X).
    """

    def __init__(
        self,
        base: str = "affine",
        *,
        objective: str = "mse",
        init: Any = "affine",
        hidden: int = 256,
        depth: int = 1,
        activation: str = "gelu",
        steps: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        patience: int = 3,
        min_delta: float = 1e-4,
        val_every: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.base = base
        self.objective = objective
        self.init = init
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
        self.val_fraction = val_fraction
        self.seed = seed
        self.progress = progress

    # -- checks -------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_net_params(
            self, ("hidden", "depth", "steps", "batch_size", "patience"), ("weight_decay", "min_delta")
        )

    def _check_call(self, loss: Any, batches: Any, val_batches: Any, d_in: int, device: torch.device) -> None:
        """The objective decides which of `loss`, `batches`, `val_batches` are given."""
        given = {"loss": loss, "batches": batches, "val_batches": val_batches}
        if self.objective == "mse":
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise TypeError(
                    f"Adapter(objective='mse') trains on the rows X, Y themselves: {', '.join(extra)} must be "
                    "None (they are for objective='ce' / 'kl')"
                )
            return
        missing = [k for k in ("loss", "batches") if given[k] is None]
        if missing:
            raise TypeError(
                f"Adapter(objective={self.objective!r}) needs {' and '.join(missing)}: the loss is computed by the "
                "caller, e.g. through model B; xlens_align.fitting.train_adapter(pair, ...) builds them "
                "(loss(apply, batch) -> (total, count), batches: a list of objects with .x)"
            )
        if not callable(loss):
            raise TypeError(
                f"loss must be callable as loss(apply, batch) -> (total, count), got {type(loss).__name__}"
            )
        _check_batches(batches, "batches", d_in, device)
        if val_batches is not None:
            _check_batches(val_batches, "val_batches", d_in, device)

    # -- the network --------------------------------------------------------------------------
    def _architecture(self, d_in: int, d_out: int) -> nn.Module:
        if self.base == "affine":
            return nn.Linear(d_in, d_out)
        return ResidualMLP(d_in, d_out, self.hidden, self.depth, self.activation)

    def _param_to_json(self, name: str, value: Any) -> Any:
        if name == "init" and isinstance(value, AlignmentMap):
            return {"fitted_map": value.kind}  # the map itself is not saved; `init_` records it
        return super()._param_to_json(name, value)

    # -- initialisation -----------------------------------------------------------------------
    def _same_net(self, init: Adapter | MLP, d_in: int, d_out: int) -> None:
        init._check_fitted()
        if (init.d_in_, init.d_out_) != (d_in, d_out) or (
            self.base == "mlp"
            and (init.hidden, init.depth, init.activation) != (self.hidden, self.depth, self.activation)
        ):
            raise ValueError(
                f"init {type(init).__name__} has other dimensions or architecture (d_in, d_out, hidden, depth, "
                f"activation) than this base={self.base!r} adapter [{d_in} -> {d_out}]"
            )

    def _init_from(self, init: Any, X: Tensor, Y: Tensor) -> None:
        """Set ``prep_x_``, ``prep_y_``, ``net_`` and ``init_`` from `init` and the rows."""
        d_in, d_out = X.shape[1], Y.shape[1]
        if isinstance(init, Adapter | MLP):
            if isinstance(init, Adapter) and init.base != self.base:
                raise ValueError(f"init Adapter has base={init.base!r}, this one base={self.base!r}")
            if isinstance(init, MLP) and self.base != "mlp":
                raise TypeError("an MLP map can only initialise base='mlp' adapters")
            self._same_net(init, d_in, d_out)
            self.prep_x_, self.prep_y_ = init.prep_x_.copy(), init.prep_y_.copy()
            self.net_ = copy.deepcopy(init.net_)
            self.init_ = init.kind
            return
        label = "random" if init is None else init
        if isinstance(init, dict):
            raise ValueError(
                f"init was a fitted {init.get('fitted_map')!r} map when this adapter was saved; maps given as "
                "init are not saved with it: set_params(init=<fitted map>) to refit"
            )
        if isinstance(init, str) or init is None:
            if init not in _INITS:
                raise ValueError(f"init must be None, 'affine', 'procrustes' or a fitted map, got {init!r}")
            if init is not None:
                init = Affine(alpha="cv").fit(X, Y) if init == "affine" else Procrustes(scale=True).fit(X, Y)
        elif not isinstance(init, AlignmentMap):
            raise TypeError(
                f"init must be None, 'affine', 'procrustes' or a fitted AlignmentMap, got {type(init).__name__}"
            )
        else:
            init._check_fitted()
            if not (
                isinstance(getattr(init, "weight_", None), Tensor)
                and isinstance(getattr(init, "bias_", None), Tensor)
            ):
                raise TypeError(
                    f"init {type(init).__name__} is not a linear map (weight_, bias_); give a linear map, an MLP "
                    "(base='mlp') or an Adapter"
                )
            if (init.d_in_, init.d_out_) != (d_in, d_out):
                raise ValueError(f"init map is [{init.d_in_} -> {init.d_out_}], X, Y are [{d_in} -> {d_out}]")
            label = f"map:{init.kind}"
        px = Preprocessor(center=True, mode="standardize")
        py = Preprocessor(center=True, mode="standardize")
        prep_in = getattr(init, "prep_x_", None)
        if isinstance(prep_in, Preprocessor) and prep_in.winsor_lo is not None:
            px.set_winsor(prep_in.winsor_lo, prep_in.winsor_hi, d_in)
        st = CrossStats.from_data(X, Y, map_x=px.winsorize)
        px.fit_moments(st.x)
        py.fit_moments(st.y)
        net = self._new_net(d_in, d_out)
        if init is not None:
            # y = wins(x) W + b  ->  u = z (diag(s_x) W diag(1/s_y)) + (o_x W + b - o_y) / s_y
            W, b = init.weight_.double().to(X.device), init.bias_.double().to(X.device)
            lin = net if isinstance(net, nn.Linear) else net.skip
            with torch.no_grad():
                lin.weight.copy_((px.scale[:, None] * W / py.scale[None, :]).T.float())
                lin.bias.copy_(((px.offset @ W + b - py.offset) / py.scale).float())
        self.prep_x_, self.prep_y_, self.net_ = px, py, net
        self.init_ = label

    # -- training -----------------------------------------------------------------------------
    def fit(
        self,
        X: Float[Tensor, "n d_in"],
        Y: Float[Tensor, "n d_out"],
        *,
        loss: BatchLoss | None = None,
        batches: Sequence[Any] | None = None,
        val_batches: Sequence[Any] | None = None,
    ) -> Adapter:
        """Fit on paired rows X [n, d_A], Y [n, d_B] (standardisation, init); with
        ``objective="mse"`` train on them, else on `loss` over `batches` (module docstring).
        The net lives on X's device. Returns self."""
        self._check_params()
        X, Y = check_pair(X, Y)
        self._check_call(loss, batches, val_batches, X.shape[1], X.device)
        self._init_from(self.init, X, Y)
        self.net_ = self.net_.to(X.device)
        if self.objective == "mse":
            step_loss, train_batches, epochs, val = self._on_rows(X, Y)
        else:
            step_loss = self._wrap(loss, X.device)
            train_batches, epochs, val = (
                list(batches),
                training.shuffled(list(batches), self.seed),
                val_batches,
            )
        self.init_train_loss_ = training.evaluate(self.net_, step_loss, train_batches)
        run = training.train(
            self.net_,
            step_loss,
            epochs,
            val,
            max_steps=self.steps,
            val_every=self.val_every,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=self.patience,
            min_delta=self.min_delta,
            progress=self.progress,
            desc="adapter",
        )
        self.init_val_loss_ = run.init_val_loss
        self.history_ = [
            {"epoch": 0, "step": 0, "train_loss": self.init_train_loss_, "val_loss": run.init_val_loss}
        ]
        self.history_ += run.history
        self.best_val_loss_, self.best_step_, self.stopped_early_ = (
            run.best_val_loss,
            run.best_step,
            run.stopped_early,
        )
        self.final_train_loss_ = training.evaluate(self.net_, step_loss, train_batches)
        self.d_in_, self.d_out_, self.n_samples_ = int(X.shape[1]), int(Y.shape[1]), int(X.shape[0])
        return self

    def _on_rows(self, X: Tensor, Y: Tensor) -> tuple[training.Loss, list, training.Epochs, list | None]:
        """``objective="mse"``: (loss, training batches, epochs, validation batches) on the
        standardised rows, `val_fraction` of them held out by `files.split_indices`."""
        dev = X.device
        tr, va = (
            i.to(dev) for i in split_indices(X.shape[0], self.val_fraction, self.seed, name="val_fraction")
        )
        xt, xv = (prepared_rows(self.prep_x_, X[i], dev) for i in (tr, va))
        yt, yv = (prepared_rows(self.prep_y_, Y[i], dev) for i in (tr, va))
        epochs = training.row_batches(xt, yt, self.batch_size, self.seed)
        val = training.chunks(xv, yv) if xv.shape[0] else None
        return training.row_mse(self.net_), training.chunks(xt, yt), epochs, val

    def _wrap(self, loss: BatchLoss, device: torch.device) -> training.Loss:
        """`loss(apply, batch)` as the training loop's ``batch -> (total, count)``, with `apply` the
        differentiable float32 map (preprocessors cast once)."""
        px, py, net = (
            self.prep_x_.copy(torch.float32, device),
            self.prep_y_.copy(torch.float32, device),
            self.net_,
        )

        def apply(x: Tensor) -> Tensor:
            return py.inverse(net(px.forward(x)))

        def step_loss(batch: Any) -> tuple[Tensor, int]:
            out = loss(apply, batch)
            if not (
                isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and out[0].ndim == 0
            ):
                raise TypeError(f"loss must return (total: scalar Tensor, count: int), got {out!r:.200}")
            total, count = out
            try:  # an int, a numpy integer or an integer tensor
                n = -1 if isinstance(count, bool) else operator.index(count)
            except TypeError:
                n = -1
            if n < 0:
                raise TypeError(
                    f"loss must return (total, count) with count an int >= 0, got count={count!r}"
                )
            return total, n

        return step_loss


def _check_batches(batches: Any, name: str, d_in: int, device: torch.device) -> None:
    if isinstance(batches, str | bytes) or not isinstance(batches, Sequence) or not batches:
        raise TypeError(f"{name} must be a non-empty list of batch objects with .x, got {batches!r:.100}")
    for i, b in enumerate(batches):
        x = getattr(b, "x", None)
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d_in:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name}[{i}].x must be a tensor of A's rows [n, {d_in}], got {got}")
        if x.dtype != torch.float32 or x.device != device:
            raise ValueError(
                f"{name}[{i}].x must be float32 on {device} (X's device, where the net lives), "
                f"got {x.dtype} on {x.device}"
            )
