"""Linear probes, and carrying a probe fit on A's rows over to B's rows through a map.

>>> p_a = fit_probe(X_a_train, y_train)                     # logistic regression on A's rows
>>> p_ab = transfer_probe(m, p_a, method="pinv")             # read B's rows through m's pseudo-inverse
>>> p_ab = transfer_probe(m, p_a, method="refit", rows=X_a_train, labels=y_train)
>>> probe_accuracy({"transferred": p_ab, "own": fit_probe(X_b_train, y_train)}, X_b_held, y_held)

Two ways to transfer (`TRANSFER_METHODS`):

* ``"pinv"`` (linear maps ``y = x W + b`` only): A's probe ``s(x) = x.w + c`` composed with the
  map's pseudo-inverse ``x = (y - b) W^+``, i.e. ``w_B = W^+ w`` and ``c_B = c - b.w_B``. Nothing
  is refit: B's rows are scored by A's probe as if they were A's.
* ``"refit"`` (any map): a new probe fit on ``map(rows)`` (A's training rows sent into B's space)
  with A's labels. It uses the map, A's rows and A's labels, never B's rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from xlens_align.transfer.measure import interval
from xlens_align.transfer.vectors import linear_part
from xlens_align.validate import check_matrix, positive_float, positive_int

__all__ = ["TRANSFER_METHODS", "Probe", "ProbeTable", "fit_probe", "probe_accuracy", "transfer_probe"]

TRANSFER_METHODS = ("pinv", "refit")


@dataclass(frozen=True)
class Probe:
    """A linear probe on raw activations: ``score(x) = x . weight + bias``, class 1 where > 0."""

    weight: Float[Tensor, " d"]
    bias: float

    def scores(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        X = check_matrix(X, "X")
        if X.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"X must have {self.weight.shape[0]} columns (the probe's d), got {tuple(X.shape)}"
            )
        return X.to(torch.float64).cpu() @ self.weight + self.bias

    def predict(self, X: Float[Tensor, "n d"]) -> Int[Tensor, " n"]:
        return (self.scores(X) > 0).long()

    def correct(self, X: Float[Tensor, "n d"], y: Any) -> Float[Tensor, " n"]:
        """1.0 where the prediction equals the label, else 0.0 (float64, per row)."""
        y = _labels(y, X.shape[0])
        return (self.predict(X) == y).to(torch.float64)


def _labels(y: Any, n: int) -> Int[Tensor, " n"]:
    """Labels as a LongTensor [n] of 0/1."""
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] (one per row), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.is_complex():
        raise TypeError(f"labels must be integers 0/1, got dtype {y.dtype}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()))[:8]}")
    return y.long().cpu()


def fit_probe(X: Float[Tensor, "n d"], y: Any, *, l2: float = 1e-2, max_iter: int = 200) -> Probe:
    """L2-regularised logistic regression on standardized columns (float64, L-BFGS), returned as a
    `Probe` on raw activations. `l2` is the penalty ``l2/2 |w|^2`` on the standardized weights,
    added to the mean log-loss."""
    X = check_matrix(X, "X", min_rows=2).to(torch.float64).cpu()
    y = _labels(y, X.shape[0])
    if y.min() == y.max():
        raise ValueError("labels hold one class only: a probe needs examples of both 0 and 1")
    l2 = positive_float(l2, "l2")
    max_iter = positive_int(max_iter, "max_iter")
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8 * max(1.0, float(X.std(0).max())))
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10)
    yf = y.to(torch.float64)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, yf) + 0.5 * l2 * w.square().sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / sd).contiguous()
    return Probe(w_raw, float(b.detach() - mu @ w_raw))


def transfer_probe(
    map: Any,
    probe: Probe,
    *,
    method: str = "pinv",
    rows: Float[Tensor, "n d_a"] | None = None,
    labels: Any = None,
    **fit_kw: Any,
) -> Probe:
    """A probe on B's rows from `probe` (fit on A's rows) and `map` (A -> B); see the module doc
    for ``method="pinv"`` (linear maps) and ``"refit"`` (needs `rows` and `labels` of A)."""
    if method not in TRANSFER_METHODS:
        raise ValueError(f"method must be one of {TRANSFER_METHODS}, got {method!r}")
    if not isinstance(probe, Probe):
        raise TypeError(f"probe must be a Probe (fit_probe), got {type(probe).__name__}")
    if method == "refit":
        if rows is None or labels is None:
            raise ValueError("method='refit' needs rows= (A's training rows) and labels= (their labels)")
        X = check_matrix(rows, "rows", min_rows=2)
        return fit_probe(map.transform(X.to(torch.float64)).to(torch.float64), labels, **fit_kw)
    lin = linear_part(map)
    if lin is None:
        raise ValueError(
            f"method='pinv' needs a linear map (a fitted LinearMap without winsorizing), got "
            f"{type(map).__name__}: use method='refit' with rows= and labels="
        )
    W, bias = lin
    if W.shape[0] != probe.weight.shape[0]:
        raise ValueError(f"the probe has d={probe.weight.shape[0]}, the map's input has d={W.shape[0]}")
    w_b = torch.linalg.pinv(W) @ probe.weight
    return Probe(w_b.contiguous(), float(probe.bias - bias @ w_b))


@dataclass
class ProbeTable:
    """Held-out accuracy of each probe, with chance (the majority class's share) and 95%
    bootstrap intervals over rows."""

    correct: dict[str, Tensor]
    chance: float
    n_boot: int
    seed: int

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"probe": k, "accuracy": float(c.mean()), "ci": interval(c, self.n_boot, self.seed)}
            for k, c in self.correct.items()
        ]

    @property
    def text(self) -> str:
        n = len(next(iter(self.correct.values())))
        lines = [f"probe accuracy on {n} held-out rows (chance = majority class {self.chance:.3f})"]
        for r in self.rows():
            lines.append(f"{r['probe']:<22}{r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"chance": self.chance, "n": len(next(iter(self.correct.values()))), "rows": self.rows()}


def probe_accuracy(
    probes: Mapping[str, Probe], X: Float[Tensor, "n d"], y: Any, *, n_boot: int = 1000, seed: int = 0
) -> ProbeTable:
    """Accuracy of each probe on held-out rows `X` with labels `y`, against chance."""
    if not isinstance(probes, Mapping) or not probes:
        raise ValueError("probes must be a non-empty mapping name -> Probe")
    y = _labels(y, check_matrix(X, "X").shape[0])
    chance = float(max(y.double().mean(), 1 - y.double().mean()))
    correct = {k: p.correct(X, y) for k, p in probes.items()}
    return ProbeTable(correct, chance, positive_int(n_boot, "n_boot"), seed)
