"""The one training loop of the learned maps (`MLP`, `Adapter`): AdamW with early stopping.

`train` knows nothing about maps: it steps AdamW on ``total / count`` of a loss callable over
opaque batches, checks the validation loss ``sum(total) / sum(count)`` (no grad, eval mode) every
`val_every` steps or once per epoch, stops after `patience` checks without a relative improvement
of `min_delta`, and restores the best weights. A non-finite training loss raises
`FloatingPointError` naming the step.

Batches come from an ``epochs`` callable (epoch number -> that epoch's batches): `row_batches`
(seeded minibatches of paired rows), `shuffled` (a seeded order of given batches), or a caller's
own (e.g. a stream).

>>> run = train(net, row_mse(net), row_batches(X, Y, 256, seed=0), chunks(Xv, Yv), max_epochs=20)
>>> run.history[-1], run.best_val_loss
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from xlens_align.stats import CHUNK_ROWS

__all__ = ["TrainRun", "chunks", "evaluate", "row_batches", "row_mse", "shuffled", "train"]

Loss = Callable[[Any], tuple[Tensor, int]]
"""batch -> (total: scalar Tensor, count: int); the step minimises total / count."""
Epochs = Callable[[int], Iterable[Any]]
"""epoch number (1, 2, ...) -> that epoch's batches; an epoch without batches ends training."""


@dataclass
class TrainRun:
    """What `train` did. `history`: one dict per check (``epoch``, ``step``, ``train_loss`` = mean
    over the steps since the previous check, ``val_loss`` = None without validation batches)."""

    history: list[dict[str, Any]]
    init_val_loss: float | None
    best_val_loss: float | None
    best_step: int
    best_epoch: int
    stopped_early: bool
    steps: int


def evaluate(net: nn.Module, loss: Loss, batches: Iterable[Any]) -> float:
    """``sum(total) / sum(count)`` of `loss` over `batches`, with `net` in eval mode and no grad."""
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            t, n = loss(batch)
            total += float(t)
            count += int(n)
    return total / max(count, 1)


def row_mse(net: nn.Module) -> Loss:
    """Loss of ``(x, y)`` row batches: (sum over rows of the per-row mean squared error, rows)."""

    def loss(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = batch
        return (net(x) - y).square().mean(1).sum(), x.shape[0]

    return loss


def row_batches(X: Tensor, Y: Tensor, batch_size: int, seed: int) -> Epochs:
    """Epochs of ``(X[idx], Y[idx])`` minibatches of `batch_size` rows, in a fresh seeded random
    order per epoch (the same sequence for the same `seed`)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = X.shape[0]

    def epoch(_: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(n, generator=gen).to(X.device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            yield X[idx], Y[idx]

    return epoch


def shuffled(items: Sequence[Any], seed: int) -> Epochs:
    """Epochs of all `items`, in a fresh seeded random order per epoch."""
    gen = torch.Generator().manual_seed(int(seed))
    return lambda _: [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]


def chunks(X: Tensor, Y: Tensor, size: int = CHUNK_ROWS) -> list[tuple[Tensor, Tensor]]:
    """``(X, Y)`` in consecutive row chunks (views), e.g. validation batches."""
    return [(X[i : i + size], Y[i : i + size]) for i in range(0, X.shape[0], size)]


def train(
    net: nn.Module,
    loss: Loss,
    epochs: Epochs,
    val_batches: Sequence[Any] | None = None,
    *,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    val_every: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int = 3,
    min_delta: float = 1e-4,
    progress: bool = False,
    desc: str = "training",
) -> TrainRun:
    """Train `net` in place on `loss` over the batches of `epochs`; see the module docstring.

    Stops at `max_epochs` epochs or `max_steps` steps (at least one of them), at an epoch without
    batches, or early (only with `val_batches`). A check closes every `val_every` steps (None:
    every epoch) and the last step if it is not checked yet. With `val_batches` the best
    checked weights (the initial ones included) are restored at the end; without, the last ones
    stay and no early stopping happens.
    """
    if max_epochs is None and max_steps is None:
        raise ValueError("train needs max_epochs or max_steps")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    has_val = bool(val_batches)
    best = evaluate(net, loss, val_batches) if has_val else None
    best_state = copy.deepcopy(net.state_dict()) if has_val else None
    run = TrainRun([], best, best, 0, 0, False, 0)
    bad, run_total, run_count, checked = 0, 0.0, 0, 0
    epoch = last_epoch = 0

    def check() -> bool:
        """Record a check; True when early stopping is due."""
        nonlocal best, best_state, bad, run_total, run_count, checked
        val = evaluate(net, loss, val_batches) if has_val else None
        run.history.append(
            {
                "epoch": last_epoch,
                "step": run.steps,
                "train_loss": run_total / max(run_count, 1),
                "val_loss": val,
            }
        )
        run_total, run_count, checked = 0.0, 0, run.steps
        if val is None:
            run.best_step, run.best_epoch = run.steps, last_epoch
            return False
        if val < best - min_delta * abs(best):
            best, bad = val, 0
            best_state = copy.deepcopy(net.state_dict())
            run.best_val_loss, run.best_step, run.best_epoch = val, run.steps, last_epoch
        else:
            bad += 1
        bar.set_postfix(val=f"{best:.4g}")
        return bad >= patience

    bar = tqdm(total=max_steps, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in itertools.count(1):
            if max_epochs is not None and epoch > max_epochs:
                break
            seen = 0
            for batch in epochs(epoch):
                seen, last_epoch = seen + 1, epoch
                net.train()
                opt.zero_grad(set_to_none=True)
                total, count = loss(batch)
                value = total / max(count, 1)
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"{desc}: the training loss is {float(value.detach())} at step {run.steps + 1} (epoch {epoch}); "
                        "lower lr, or check the inputs"
                    )
                value.backward()
                opt.step()
                run.steps += 1
                run_total += float(total.detach())
                run_count += int(count)
                bar.update(1)
                if val_every and run.steps % val_every == 0 and check():
                    run.stopped_early = True
                    break
                if max_steps is not None and run.steps >= max_steps:
                    break
            if seen == 0 or run.stopped_early or (max_steps is not None and run.steps >= max_steps):
                break
            if not val_every and check():
                run.stopped_early = True
                break
        if not run.stopped_early and run.steps > checked:
            check()
    finally:
        bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return run
