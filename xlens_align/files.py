"""Files written whole or not at all, and the one seeded train / held-out split.

`atomic_path` is the package's only way to write a result or cache file: the content goes to a
temporary file beside the target and is renamed over it once complete, so an interrupted run
never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import operator
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["atomic_path", "check_seed", "held_out_count", "split_indices"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path`, on error it is removed.

    >>> with atomic_path("m.safetensors") as tmp:
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name inside it")
    blocker = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {blocker} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # say which file could not be written, not the hidden temporary one
        raise type(e)(
            f"cannot write {path}: cannot create a file in {path.parent} ({e.strerror or e})"
        ) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only; published files get the usual mode
    try:
        yield Path(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise type(e)(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_seed(seed: Any, name: str = "seed") -> int:
    """`seed` as an int (numpy ints accepted); TypeError naming `name` for a float, str or bool."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {seed!r}") from None


def held_out_count(held_out: float | int, n: int, name: str = "held_out") -> int:
    """How many of `n` items a `held_out` fraction in [0, 1) or int count holds out.

    A positive fraction holds out at least one item when n >= 2; at least one item always stays
    in training (ValueError otherwise).
    """
    if isinstance(held_out, bool) or not isinstance(held_out, int | float):
        raise TypeError(f"{name} must be a fraction in [0, 1) or an int count, got {held_out!r}")
    if isinstance(held_out, int):
        if held_out < 0:
            raise ValueError(f"{name} count must be >= 0, got {held_out}")
        k = held_out
    else:
        if not 0.0 <= held_out < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1), got {held_out}")
        k = round(held_out * n)
        if held_out > 0 and n >= 2:
            k = max(k, 1)
    if k > 0 and k >= n:
        raise ValueError(f"{name}={held_out!r} would leave nothing to train on out of {n} items")
    return k


def split_indices(
    n: int, held_out: float | int, seed: int, name: str = "held_out"
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_held"]]:
    """Deterministic (train, held-out) indices of `n` items, each sorted: a seeded permutation
    whose first `held_out_count(held_out, n)` entries are held out."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"need at least one item to split, got n={n!r}")
    k = held_out_count(held_out, n, name)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(check_seed(seed)))
    return perm[k:].sort().values, perm[:k].sort().values
