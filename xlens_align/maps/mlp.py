"""Learned nonlinear alignment maps: the `ResidualMLP` network, the `NetMap` base of the maps
built on a network (`MLP`, `Adapter`), and `MLP`, trained on pairs with `maps.training.train`."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from xlens_align.files import check_seed, split_indices
from xlens_align.maps import training
from xlens_align.maps.base import AlignmentMap, register
from xlens_align.maps.preprocess import Preprocessing, PreprocessingParams, Preprocessor
from xlens_align.maps.solve import prepare, ridge_coef
from xlens_align.stats import CHUNK_ROWS, CrossStats
from xlens_align.validate import check_pair, nonneg_float, positive_float, positive_int

__all__ = ["ACTIVATIONS", "MLP", "NetMap", "ResidualMLP", "prepared_rows"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}

Batches = Iterable[tuple[Tensor, Tensor]] | Callable[[], Iterable[tuple[Tensor, Tensor]]]


class ResidualMLP(nn.Module):
    """``skip(x) + head(body(x))``: a linear skip plus `depth` hidden layers of width `hidden`.

    The head starts at zero, so the network starts as its linear skip.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int, depth: int, activation: str) -> None:
        super().__init__()
        self.skip = nn.Linear(d_in, d_out)
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), ACTIVATIONS[activation]()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, d_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        return self.skip(x) + self.head(self.body(x))


def prepared_rows(p: Preprocessor, x: Tensor, device: torch.device | str) -> Tensor:
    """`p` applied to rows of `x` in float64 chunks, returned as float32 on `device` (zero rows
    give a [0, d] tensor)."""
    starts = range(0, max(x.shape[0], 1), CHUNK_ROWS)  # one (empty) chunk when x has no rows
    return torch.cat([p.forward(x[i : i + CHUNK_ROWS].double()).float().to(device) for i in starts])


def check_net_params(m: Any, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """Shared hyper-parameter checks of the network maps: positive ints `ints`, floats >= 0
    `floats`, ``lr`` > 0, ``val_every`` None or a positive int, a known ``activation``."""
    for name in ints:
        positive_int(getattr(m, name), name)
    for name in floats:
        nonneg_float(getattr(m, name), name)
    positive_float(m.lr, "lr")
    check_seed(m.seed)
    if m.val_every is not None:
        positive_int(m.val_every, "val_every")
    if m.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {m.activation!r}")


class NetMap(AlignmentMap):
    """Base of the maps computed by a network: ``y = prep_y_.inverse(net_(prep_x_.forward(x)))``.

    Fitted: ``net_`` (float32, on its training device), ``prep_x_``, ``prep_y_``. Subclasses say
    which network in `_architecture`; `_new_net` builds it with ``seed``'s initial weights.
    """

    seed: int

    def _architecture(self, d_in: int, d_out: int) -> nn.Module:
        raise NotImplementedError

    def _new_net(self, d_in: int, d_out: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            return self._architecture(d_in, d_out)

    def _build_module(self, name: str) -> nn.Module:
        if name != "net_":
            return super()._build_module(name)
        return self._new_net(self.d_in_, self.d_out_)

    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        dev = next(self.net_.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, X.shape[0], CHUNK_ROWS):
                z = self.prep_x_.forward(X[i : i + CHUNK_ROWS].double()).float().to(dev)
                out.append(self.prep_y_.inverse(self.net_(z).double().to(X.device)))
        return torch.cat(out)


@register("mlp")
class MLP(PreprocessingParams, NetMap):
    """Nonlinear map ``y' = x' W + b + MLP(x')`` in preprocessed coordinates, trained with AdamW.

    Loss: mean squared error in the preprocessed target space plus ``cosine_weight * (1 - cos)``,
    the mean row cosine between prediction and target in raw target coordinates. Training is
    `maps.training.train`: early stopping on held-out pairs (`val_fraction` of the rows, split
    by `xlens_align.files.split_indices`; 0 = none, all epochs run) checked after every epoch (or
    every `val_every` optimiser steps), stopping after `patience` checks without a relative
    improvement of `min_delta`, best weights restored. ``init="affine"`` starts the skip at the
    least-squares solution of the training pairs (the head starts at zero, so training starts
    from the Affine map); ``"random"`` uses PyTorch's default init. Deterministic given `seed` on
    CPU. Trained in float32 on `device`. Preprocessing keywords: see `PreprocessingParams`.

    Fitted: ``net_`` (`ResidualMLP`), ``prep_x_``, ``prep_y_``, ``history_`` (one dict per check:
    epoch, step, train_loss, val_loss), ``best_epoch_``, ``best_step_``, ``best_val_loss_``,
    ``stopped_early_``.
    """

    def __init__(
        self,
        hidden: int = 256,
        depth: int = 1,
        activation: str = "gelu",
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        epochs: int = 100,
        batch_size: int = 256,
        cosine_weight: float = 0.0,
        patience: int = 5,
        min_delta: float = 1e-4,
        val_fraction: float = 0.1,
        val_every: int | None = None,
        init: str = "affine",
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
        **preprocessing: Unpack[Preprocessing],
    ) -> None:
        self.hidden = hidden
        self.depth = depth
        self.activation = activation
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.cosine_weight = cosine_weight
        self.patience = patience
        self.min_delta = min_delta
        self.val_fraction = val_fraction
        self.val_every = val_every
        self.init = init
        self.seed = seed
        self.device = device
        self.progress = progress
        self._set_preprocessing(preprocessing)

    def _check_params(self) -> None:
        check_net_params(self, ("hidden", "depth", "epochs", "batch_size", "patience"), _FLOATS)
        if self.init not in ("affine", "random"):
            raise ValueError(f"init must be 'affine' or 'random', got {self.init!r}")

    def _architecture(self, d_in: int, d_out: int) -> nn.Module:
        return ResidualMLP(d_in, d_out, self.hidden, self.depth, self.activation)

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, X: Tensor, Y: Tensor) -> None:
        self._check_params()
        px, py = self._preprocessors(X, X.shape[1])
        tr, va = split_indices(X.shape[0], self.val_fraction, self.seed, name="val_fraction")
        tr, va = tr.to(X.device), va.to(X.device)
        self._setup(CrossStats.from_data(X[tr], Y[tr], map_x=px.winsorize), px, py)
        dev = self.device
        xt, yt = prepared_rows(px, X[tr], dev), prepared_rows(py, Y[tr], dev)
        xv, yv = prepared_rows(px, X[va], dev), prepared_rows(py, Y[va], dev)
        per_epoch = math.ceil(xt.shape[0] / self.batch_size)
        epochs = training.row_batches(xt, yt, self.batch_size, self.seed)
        self._train(epochs, training.chunks(xv, yv), max_steps=self.epochs * per_epoch)

    def fit_stream(
        self,
        batches: Batches,
        val: tuple[Tensor, Tensor],
        stats: CrossStats | None = None,
    ) -> MLP:
        """Train on streamed (X, Y) batches; `val` = held-out (Xv, Yv) for early stopping.

        `batches`: a re-iterable (list, DataLoader: one pass per epoch), a zero-argument callable
        returning a fresh iterable per epoch, or a one-shot iterator (a single pass; use
        `val_every` to check during it). Preprocessing (and ``init="affine"``) come from `stats`
        (CrossStats of the training stream) if given, else from one extra pass over a re-iterable
        stream, else (one-shot) from the first batch only.
        """
        self._check_params()
        Xv, Yv = check_pair(*val) if isinstance(val, tuple | list) and len(val) == 2 else (None, None)
        if Xv is None:
            raise TypeError("val must be a pair (X_val, Y_val) of tensors")
        d_in, d_out = Xv.shape[1], Yv.shape[1]
        px, py = self._preprocessors(None, d_in)

        def checked(it: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
            for item in it:
                if not (isinstance(item, tuple | list) and len(item) == 2):
                    raise TypeError(f"each batch must be a pair (X, Y), got {type(item).__name__}")
                xb, yb = check_pair(item[0], item[1], min_rows=1)
                if xb.shape[1] != d_in or yb.shape[1] != d_out:
                    raise ValueError(
                        f"batch shapes {tuple(xb.shape)}, {tuple(yb.shape)} do not match val's d_in={d_in}, d_out={d_out}"
                    )
                yield xb, yb

        if callable(batches):
            factory, one_shot = batches, False
        else:
            one_shot = iter(batches) is batches
            factory = (lambda: batches) if not one_shot else None
        first: list[tuple[Tensor, Tensor]] = []
        if stats is None:
            stats = CrossStats.empty(d_in, d_out)
            if one_shot:
                first = list(itertools.islice(checked(batches), 1))
                if not first:
                    raise ValueError("the batch iterator is empty")
                stats.update(px.winsorize(first[0][0].double()), first[0][1])
            else:
                for xb, yb in checked(factory()):
                    stats.update(px.winsorize(xb.double()), yb)
        elif not isinstance(stats, CrossStats) or stats.shape != (d_in, d_out):
            raise ValueError(f"stats must be a CrossStats of shape {(d_in, d_out)}")
        if stats.n < 1:
            raise ValueError("the batch stream yielded no rows")
        if one_shot and self.epochs > 1:
            warnings.warn("fit_stream got a one-shot iterator: training makes a single pass", stacklevel=2)
        self._setup(stats, px, py)
        dev = self.device

        def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            if one_shot:
                src = itertools.chain(first, checked(batches)) if epoch == 1 else iter(())
            else:
                src = checked(factory())
            for xb, yb in src:
                yield prepared_rows(px, xb, dev), prepared_rows(py, yb, dev)

        val_batches = training.chunks(prepared_rows(px, Xv, dev), prepared_rows(py, Yv, dev))
        self._train(epoch_batches, val_batches, max_steps=None)
        return self

    def _setup(self, stats: CrossStats, px: Preprocessor, py: Preprocessor) -> None:
        px.fit_moments(stats.x)
        py.fit_moments(stats.y)
        net = self._new_net(stats.d_x, stats.d_y)
        if self.init == "affine":
            p = prepare(stats, px, py)
            coef = ridge_coef(p.sxx, p.sxy, p.n, 0.0)
            with torch.no_grad():
                net.skip.weight.copy_(coef.T.float())
                net.skip.bias.zero_()
        self.net_ = net.to(self.device)
        self.prep_x_, self.prep_y_ = px, py
        self.d_in_, self.d_out_ = stats.d_x, stats.d_y
        self.n_samples_ = stats.n

    def _train(
        self, epochs: training.Epochs, val: list[tuple[Tensor, Tensor]], max_steps: int | None
    ) -> None:
        net, cw = self.net_, float(self.cosine_weight)
        loss = training.row_mse(net)
        if cw:
            py32 = self.prep_y_.copy(torch.float32, self.device)

            def loss(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
                x, y = batch
                pred = net(x)
                cos = F.cosine_similarity(py32.inverse(pred), py32.inverse(y), dim=1, eps=1e-8)
                return ((pred - y).square().mean(1) + cw * (1 - cos)).sum(), x.shape[0]

        run = training.train(
            net,
            loss,
            epochs,
            val,
            max_epochs=self.epochs,
            max_steps=max_steps,
            val_every=self.val_every,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=self.patience,
            min_delta=self.min_delta,
            progress=self.progress,
            desc="MLP",
        )
        self.history_ = run.history
        self.best_epoch_, self.best_step_ = run.best_epoch, run.best_step
        self.best_val_loss_, self.stopped_early_ = run.best_val_loss, run.stopped_early


_FLOATS = ("weight_decay", "cosine_weight", "min_delta")
