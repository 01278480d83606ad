"""A learned nonlinear alignment map: an MLP with a residual linear skip, trained on pairs."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from xlens_align.maps.base import AlignmentMap, check_pair, register, split_indices
from xlens_align.maps.linear import prepare, ridge_coef
from xlens_align.maps.preprocess import Preprocessor
from xlens_align.stats import CrossStats

__all__ = ["MLP", "ResidualMLP"]

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


def _rows(p: Preprocessor, x: Tensor, device: torch.device | str, chunk: int = 16384) -> Tensor:
    """Preprocess rows in float64 chunks, return float32 on `device`."""
    return torch.cat(
        [p.forward(x[i : i + chunk].double()).float().to(device) for i in range(0, x.shape[0], chunk)]
    )


def _cast(p: Preprocessor, dtype: torch.dtype, device: torch.device | str) -> Preprocessor:
    tensors, cfg = p.state()
    return Preprocessor.from_state({k: v.to(dtype=dtype, device=device) for k, v in tensors.items()}, cfg)


@register("mlp")
class MLP(AlignmentMap):
    """Nonlinear map ``y' = x' W + b + MLP(x')`` in preprocessed coordinates, trained with Adam(W).

    Loss: mean squared error in the preprocessed target space plus ``cosine_weight * (1 - cos)``,
    the mean row cosine between prediction and target in raw target coordinates. Early stopping
    on held-out pairs: after every epoch (or every `val_every` optimiser steps) the validation loss
    is computed; training stops after `patience` checks without a relative improvement of
    `min_delta`, and the best weights are restored. ``init="affine"`` starts the skip at the
    least-squares solution of the training pairs (the head starts at zero, so training starts
    from the Affine map); ``"random"`` uses PyTorch's default init. Deterministic given `seed` on
    CPU. Trained in float32 on `device`. Preprocessing hyper-parameters as for `LinearMap`.

    Fitted: ``net_`` (`ResidualMLP`), ``prep_x_``, ``prep_y_``, ``history_`` (one dict per check:
    epoch, step, train_loss, val_loss), ``best_epoch_``, ``best_val_loss_``, ``stopped_early_``.
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
        center: bool = True,
        standardize: bool | str = False,
        whiten: bool | str = False,
        whiten_eps: float = 1e-6,
        clamp: float | tuple[Any, Any] | None = None,
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
        self.center = center
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.clamp = clamp

    # -- checks -------------------------------------------------------------------------------
    def _check_params(self) -> None:
        for name in ("hidden", "depth", "epochs", "batch_size", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.val_every is not None and (not isinstance(self.val_every, int) or self.val_every < 1):
            raise ValueError(f"val_every must be None or a positive int, got {self.val_every!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in ("affine", "random"):
            raise ValueError(f"init must be 'affine' or 'random', got {self.init!r}")
        for name in ("weight_decay", "cosine_weight", "min_delta"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v >= 0):
                raise ValueError(f"{name} must be a float >= 0, got {v!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a float > 0, got {self.lr!r}")

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, X: Tensor, Y: Tensor) -> None:
        self._check_params()
        px, py = self._preprocessors(self._resolve_clamp(X, X.shape[1]), X.shape[1])
        tr, va = split_indices(X.shape[0], self.val_fraction, self.seed)
        st = CrossStats.empty(X.shape[1], Y.shape[1], device=X.device)
        for i in range(0, tr.shape[0], 16384):
            idx = tr[i : i + 16384].to(X.device)
            st.update(px.clamp(X[idx].double()), Y[idx])
        self._setup(st, px, py)
        dev = self.device
        xt, yt = _rows(px, X[tr.to(X.device)], dev), _rows(py, Y[tr.to(Y.device)], dev)
        xv, yv = _rows(px, X[va.to(X.device)], dev), _rows(py, Y[va.to(Y.device)], dev)
        gen = torch.Generator().manual_seed(int(self.seed))
        n, bs = xt.shape[0], self.batch_size

        def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            perm = torch.randperm(n, generator=gen).to(dev)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                yield xt[idx], yt[idx]

        self._train(epoch_batches, xv, yv)

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
        px, py = self._preprocessors(self._resolve_clamp(None, d_in), d_in)

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
                stats.update(px.clamp(first[0][0].double()), first[0][1])
            else:
                for xb, yb in checked(factory()):
                    stats.update(px.clamp(xb.double()), yb)
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
                yield _rows(px, xb, dev), _rows(py, yb, dev)

        self._train(epoch_batches, _rows(px, Xv, dev), _rows(py, Yv, dev))
        return self

    def _setup(self, stats: CrossStats, px: Preprocessor, py: Preprocessor) -> None:
        px.fit_moments(stats.x)
        py.fit_moments(stats.y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            net = ResidualMLP(stats.d_x, stats.d_y, self.hidden, self.depth, self.activation)
        if self.init == "affine":
            p = prepare(stats, px, py)
            coef = ridge_coef(p.sxx, p.sxy, p.n, 0.0)
            with torch.no_grad():
                net.skip.weight.copy_(coef.T.float())
                net.skip.bias.zero_()
        self.net_ = net.to(self.device)
        self.prep_x_, self.prep_y_ = px, py
        self.d_in_, self.d_out_ = stats.d_x, stats.d_y

    def _train(
        self,
        epoch_batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
        xv: Tensor,
        yv: Tensor,
    ) -> None:
        net = self.net_
        py32 = _cast(self.prep_y_, torch.float32, self.device)
        cw = float(self.cosine_weight)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def loss_parts(pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            se = (pred - y).square().mean(1)
            if cw == 0:
                return se, torch.zeros_like(se)
            return se, 1 - F.cosine_similarity(py32.inverse(pred), py32.inverse(y), dim=1, eps=1e-8)

        def evaluate() -> float:
            net.eval()
            total = 0.0
            with torch.no_grad():
                for i in range(0, xv.shape[0], 8192):
                    se, cos = loss_parts(net(xv[i : i + 8192]), yv[i : i + 8192])
                    total += float((se + cw * cos).sum())
            return total / xv.shape[0]

        best = evaluate()
        best_state = copy.deepcopy(net.state_dict())
        self.best_epoch_, self.best_val_loss_ = 0, best
        self.history_: list[dict[str, Any]] = []
        bad, step, run, cnt = 0, 0, 0.0, 0
        epoch = 0

        def check() -> bool:
            nonlocal best, best_state, bad, run, cnt
            val = evaluate()
            self.history_.append(
                {"epoch": epoch, "step": step, "train_loss": run / max(cnt, 1), "val_loss": val}
            )
            run, cnt = 0.0, 0
            if val < best - self.min_delta * abs(best):
                best, bad = val, 0
                best_state = copy.deepcopy(net.state_dict())
                self.best_epoch_, self.best_val_loss_ = epoch, val
            else:
                bad += 1
            return bad >= self.patience

        stop = False
        bar = tqdm(total=self.epochs, desc="MLP", disable=not self.progress, leave=False)
        for epoch in range(1, self.epochs + 1):
            seen = 0
            for xb, yb in epoch_batches(epoch):
                net.train()
                opt.zero_grad(set_to_none=True)
                se, cos = loss_parts(net(xb), yb)
                loss = (se + cw * cos).mean()
                loss.backward()
                opt.step()
                step += 1
                seen += 1
                run += loss.item() * xb.shape[0]
                cnt += xb.shape[0]
                if self.val_every and step % self.val_every == 0 and check():
                    stop = True
                    break
            if seen == 0:
                break
            if not self.val_every and check():
                stop = True
            bar.update(1)
            bar.set_postfix(val=f"{best:.4g}")
            if stop:
                break
        bar.close()
        net.load_state_dict(best_state)
        net.eval()
        self.stopped_early_ = stop

    # -- use ----------------------------------------------------------------------------------
    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        dev = next(self.net_.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, X.shape[0], 16384):
                z = self.prep_x_.forward(X[i : i + 16384].double()).float().to(dev)
                out.append(self.prep_y_.inverse(self.net_(z).double().to(X.device)))
        return torch.cat(out)

    def _build_module(self, name: str) -> nn.Module:
        if name != "net_":
            return super()._build_module(name)
        return ResidualMLP(self.d_in_, self.d_out_, self.hidden, self.depth, self.activation)
