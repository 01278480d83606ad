"""The one place where arguments are checked: each check names the argument and what it expects.

Every public function of the package validates its inputs through these helpers, so the same
mistake gets the same message wherever it is made.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "check_finite",
    "check_matrix",
    "check_pair",
    "check_texts",
    "finite_float",
    "nonneg_float",
    "nonneg_int",
    "optional_positive_float",
    "positive_float",
    "positive_int",
]


def _is_int(value: Any) -> bool:
    """An integer (Python's or NumPy's); bools are refused."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number (Python's or NumPy's, e.g. np.float32); bools are refused."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any, name: str) -> int:
    """`value` must be an int >= 1 (bools refused)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def nonneg_int(value: Any, name: str) -> int:
    """`value` must be an int >= 0 (bools and floats such as 1.5 refused)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    """`value` must be a finite number > 0."""
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def nonneg_float(value: Any, name: str) -> float:
    """`value` must be a finite number >= 0."""
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def finite_float(value: Any, name: str) -> float:
    """`value` must be a finite number (any sign)."""
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def optional_positive_float(value: Any, name: str) -> float | None:
    """None, or a finite number > 0."""
    return None if value is None else positive_float(value, name)


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """A non-empty list of non-empty strings (a lone string is refused: wrap it in a list)."""
    if isinstance(texts, str | bytes):
        raise TypeError(f"{name} must be a list of strings, got a single string; wrap it in a list")
    if not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: pass at least one non-empty string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
        if not t:
            raise ValueError(f"{name}[{i}] is an empty string; every text needs at least one character")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            _unencodable(name, i, t, e.start)
    return texts


def _unencodable(name: str, i: int, text: str, at: int) -> None:
    """Raise the ValueError for a text holding a character UTF-8 cannot encode (a lone surrogate)."""
    cp = ord(text[at])
    kind = "a lone surrogate" if 0xD800 <= cp <= 0xDFFF else "a character UTF-8 cannot encode"
    raise ValueError(
        f"{name}[{i}] holds {kind}, U+{cp:04X}, at character {at} ({text[max(0, at - 20) : at]!r} before it); "
        "tokenizers need valid Unicode: fix the source, or clean the text with "
        "text.encode('utf-8', 'replace').decode('utf-8')"
    )


def check_finite(x: Tensor, name: str) -> None:
    """Raise ValueError naming `name` and the first bad rows if `x` holds inf or NaN."""
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = torch.nonzero(bad.reshape(x.shape[0], -1).any(dim=1)).flatten()[:8].tolist() if x.ndim else []
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite values (inf/NaN); first bad rows: {rows}. "
            "Filter or clamp activations before accumulating."
        )


def check_matrix(x: Any, name: str, *, min_rows: int = 1) -> Float[Tensor, "n d"]:
    """`x` must be a finite floating tensor [n, d] with n >= `min_rows` and d >= 1; returned as is."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} needs at least one column, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def check_pair(
    X: Any, Y: Any, *, min_rows: int = 2, what: str = "paired rows"
) -> tuple[Float[Tensor, "n dx"], Float[Tensor, "n dy"]]:
    """Paired samples X [n, d_A], Y [n, d_B] (row i of both = the same item), finite, n >= `min_rows`.

    Y is moved to X's device; dtypes are left as given.
    """
    X, Y = check_matrix(X, "X"), check_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (row i of both = the same item), "
            f"got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
        )
    if X.shape[0] < min_rows:
        raise ValueError(f"{what} need at least {min_rows} rows, got n={X.shape[0]}")
    return X, (Y if Y.device == X.device else Y.to(X.device))
