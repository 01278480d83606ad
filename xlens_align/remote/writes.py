"""A patch's writes as a remote trace makes them: ``x[index] = values`` with the index built and
checked locally, and the part of a write that falls in some batch rows (to split a large patch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..points import Point

__all__ = ["nbytes", "rows_of", "write_of"]


def write_of(
    point: Point, values: Any, positions: Any, shape: tuple[int, int, int], dtype: torch.dtype
) -> tuple:
    """(index, values) for ``x[index] = values`` inside the trace, checked here on an empty
    tensor of the stream's shape so a bad write fails locally, before any request."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"values for point {point.name!r}: a remote model takes tensors (computed locally), "
            f"not {type(values).__name__}"
        )
    values = values.detach().to("cpu", dtype)
    if positions is None:
        index: tuple = (Ellipsis,)
    elif isinstance(positions, tuple):
        index = (positions[0].cpu().long(), positions[1].cpu().long())
    elif positions.dtype == torch.bool:
        mask = positions.cpu()
        if tuple(values.shape[:2]) == tuple(mask.shape):
            values = values[mask]
        index = torch.nonzero(mask, as_tuple=True)
    else:
        index = (slice(None), positions.cpu().long())
    try:
        torch.empty(shape, dtype=dtype)[index] = values
    except (IndexError, RuntimeError) as e:
        raise ValueError(
            f"cannot write values of shape {tuple(values.shape)} into the stream at {point.name!r} "
            f"(stream shape {shape}): {e}"
        ) from e
    return index, values


def nbytes(index: Any) -> int:
    return index.numel() * index.element_size() if isinstance(index, Tensor) else 0


def rows_of(values: Any, positions: Any, r0: int, r1: int, n_rows: int) -> tuple[Any, Any]:
    """The part of one write (values, positions as in `patching`) that falls in rows r0..r1-1,
    re-indexed from row 0."""
    per_row = isinstance(values, Tensor) and values.ndim == 3 and values.shape[0] == n_rows
    if isinstance(positions, tuple):
        keep = (positions[0] >= r0) & (positions[0] < r1)
        v = values[keep] if isinstance(values, Tensor) and values.ndim == 2 else values
        return v, (positions[0][keep] - r0, positions[1][keep])
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return (values[r0:r1] if per_row else values), positions[r0:r1]
    return (values[r0:r1] if per_row else values), positions
