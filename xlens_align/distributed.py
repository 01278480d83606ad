"""A corpus split across processes (`torchrun`): each takes a shard of the texts, the float64 sums
and moments are reduced once at the end.

Under ``torchrun --nproc_per_node=N`` with a process group initialised (`init_from_env`, or the
caller's own ``torch.distributed.init_process_group``), `activations.accumulate` (so
`fitting.fit_grid`), `similarity.layer_grid` and `effects.measure` / `effects.grid` each read only
their process's `shard` of the texts and reduce what they accumulated once, at the end, with
``all_reduce`` in float64: every process then holds the same statistics, maps and numbers as one
process over all the texts (up to float64 summation order). Without an active group (one
process, or a group of one) nothing changes.

Sharding is contiguous, by blocks: the texts are cut into blocks of `block` consecutive texts
(the pipelines pass their ``batch_size``) and each process takes one contiguous run of blocks, so
every batch a process runs is a batch of the one-process run, every text is read exactly once and
a text's index is its shard's start plus its index in the shard. A process may get no text; it
still takes part in the reduction.

What is reduced: plain sums and counts (`all_reduce_sum`, `reduce_attrs`: CE/KL/top-1 sums,
mean-ablation sums, minibatch-CKA HSIC sums) and centred co-moments (`reduce_grid`: the
processes' count-weighted means are pooled first, then each process's co-moments about the pooled
means are summed, the parallel form of Chan et al.'s merge, so nothing is lost to cancellation).
The gloo backend reduces on the CPU, nccl on the process's CUDA device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .stats import Moments, StatsGrid
from .validate import positive_int

__all__ = [
    "active",
    "all_reduce_sum",
    "init_from_env",
    "is_main",
    "rank",
    "reduce_attrs",
    "reduce_cka",
    "reduce_counts",
    "reduce_grid",
    "reduce_similarity",
    "shard",
    "shard_range",
    "world_size",
]

_BUCKET = 1 << 24
"""Numbers per collective when many tensors are reduced together (128 MiB of float64)."""


def active() -> bool:
    """Whether a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without an initialised group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without an initialised group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes results and shows progress (rank 0)."""
    return rank() == 0


def shard_range(n: int, block: int = 1) -> range:
    """The indices of this process's shard of `n` texts: the texts are cut into blocks of `block`
    consecutive texts and each process takes one contiguous run of blocks (process r takes blocks
    ``[r * B // N, (r + 1) * B // N)`` of B). ``range(n)`` without an active group."""
    block = positive_int(block, "block")
    if not active():
        return range(n)
    blocks, r, w = -(-n // block), rank(), world_size()
    return range(min(n, r * blocks // w * block), min(n, (r + 1) * blocks // w * block))


def shard(texts: Sequence[Any], block: int = 1) -> list[Any]:
    """This process's texts (`shard_range`): contiguous, in blocks of `block`, so each batch of
    `block` texts a process runs is a batch of the one-process run. All of `texts` without an
    active group. Every text lands in exactly one shard; a shard may be empty."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list, got {type(texts).__name__}")
    return list(texts[i] for i in shard_range(len(texts), block))


def _comm_device() -> torch.device:
    """Where the backend reduces: the current CUDA device for nccl, the CPU otherwise."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_flat(tensors: list[Tensor], op: Any) -> list[Tensor]:
    """float64 copies of `tensors` reduced with `op` over the group, a few collectives in all
    (tensors packed into buckets of `_BUCKET` numbers), each back on its own device."""
    dev = _comm_device()
    out: list[Tensor] = []
    i = 0
    while i < len(tensors):
        j, size = i, 0
        while j < len(tensors) and (j == i or size + tensors[j].numel() <= _BUCKET):
            size += tensors[j].numel()
            j += 1
        flat = torch.cat([t.detach().to(device=dev, dtype=torch.float64).reshape(-1) for t in tensors[i:j]])
        dist.all_reduce(flat, op=op)
        for t, part in zip(tensors[i:j], flat.split([t.numel() for t in tensors[i:j]]), strict=True):
            out.append(part.view(t.shape).to(t.device))
        i = j
    return out


def all_reduce_sum(values: Sequence[Tensor | float | int], op: str = "sum") -> list[Tensor | float | int]:
    """`values` summed (``op="max"``: maximised) over all processes, in float64.

    Tensors come back as float64 on their own device, numbers as numbers (ints as ints, exact up
    to 2**53). Every process must pass the same shapes in the same order. Without an active group
    the values come back unchanged (tensors as float64)."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    tensors = []
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            tensors.append(v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            tensors.append(torch.tensor(float(v), dtype=torch.float64))
        else:
            raise TypeError(f"values[{i}] must be a Tensor or a number, got {type(v).__name__}")
    if active():
        tensors = _reduce_flat(tensors, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    out: list[Tensor | float | int] = []
    for v, t in zip(values, tensors, strict=True):
        if isinstance(v, Tensor):
            out.append(t.to(torch.float64))
        else:
            out.append(int(round(float(t))) if isinstance(v, int) else float(t))
    return out


def _shapes_like(values: list[Any]) -> list[Any]:
    """`values` with every None replaced by float64 zeros of the shape another process has there
    (a process that saw no data has no tensor yet); a None that is None everywhere stays None."""
    if not active():
        return values
    shapes = [None if v is None else tuple(v.shape) if isinstance(v, Tensor) else () for v in values]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, shapes)
    out = list(values)
    for i, v in enumerate(values):
        shape = next((s[i] for s in gathered if s[i] is not None), None) if v is None else None
        if shape is not None:
            out[i] = torch.zeros(shape, dtype=torch.float64) if shape != () else 0.0
    return out


def reduce_attrs(objs: Sequence[Any], names: Sequence[str]) -> None:
    """Sum the attributes `names` of every object in `objs` over all processes, in place (one
    reduction for all of them): numbers stay numbers (ints ints), tensors become float64. An
    attribute that is None on one process (it saw no data) counts as zeros of the others' shape."""
    values = _shapes_like([getattr(o, n) for o in objs for n in names])
    present = [i for i, v in enumerate(values) if v is not None]
    reduced = dict(zip(present, all_reduce_sum([values[i] for i in present]), strict=True))
    k = 0
    for o in objs:
        for n in names:
            if k in reduced:
                setattr(o, n, reduced[k])
            k += 1


def reduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """A dict of counts summed over all processes (keys any process has; first-seen order)."""
    if not active():
        return dict(counts)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, dict(counts))
    out: dict[str, int] = {}
    for c in gathered:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _common_exponents(exponents: Mapping[Any, int], keys: list[Any]) -> dict[Any, int]:
    """Per key, the largest power of two any process scaled by (keys no process has are left out)."""
    none = -(1 << 30)
    got = all_reduce_sum([torch.tensor([float(exponents.get(k, none)) for k in keys])], op="max")[0]
    return {k: int(e) for k, e in zip(keys, got.tolist(), strict=True) if e > none}


def reduce_grid(grid: StatsGrid, exponents: dict[tuple[str, str], int] | None = None) -> StatsGrid:
    """Pool a `StatsGrid` over all processes in place: counts, means and centred co-moments of the
    union of every process's rows, the same on every process.

    `exponents` (optional, ``{("a" | "b", point): e}``, updated in place): the power of two each
    point's rows were scaled down by (``scaled64``) on this process; each process's moments are
    first rescaled exactly to the largest exponent any process used."""
    if not active():
        return grid
    pa, pb = grid.points_a, grid.points_b
    keys = [("a", p) for p in pa] + [("b", p) for p in pb]
    got = {("a", p): m for p, m in grid.moments_a.items()} | {("b", p): m for p, m in grid.moments_b.items()}
    widths = all_reduce_sum([torch.tensor([float(got[k].d if k in got else 0) for k in keys])], op="max")[0]
    dev = next((m.mean.device for m in got.values()), torch.device("cpu"))
    n = grid.n
    moms = {k: got.get(k) or Moments.empty(int(d), dev) for k, d in zip(keys, widths.tolist(), strict=True)}
    cross = {c: grid.cross.get(c) for c in grid.pairs}
    for c in cross:
        if cross[c] is None:
            cross[c] = torch.zeros(moms["a", c[0]].d, moms["b", c[1]].d, dtype=torch.float64, device=dev)
    if exponents is not None:
        common = _common_exponents(exponents, keys)
        shift = {k: (exponents[k] - common[k]) if k in exponents else 0 for k in keys}
        moms = {k: Moments(m.n, torch.ldexp(m.mean, _t(shift[k])), torch.ldexp(m.s, _t(2 * shift[k]))) for k, m in moms.items()}  # fmt: skip
        cross = {c: torch.ldexp(v, _t(shift["a", c[0]] + shift["b", c[1]])) for c, v in cross.items()}
        exponents.update(common)
    # pooled means first, then every process's co-moments about them (no cancellation)
    sums = all_reduce_sum([n, *(m.mean * n for m in moms.values())])
    total = int(sums[0])
    mu = {k: s / total if total else s for k, s in zip(keys, sums[1:], strict=True)}
    dev_of = {k: moms[k].mean - mu[k].to(dev) for k in keys}
    shifted = [m.s + n * torch.outer(dev_of[k], dev_of[k]) for k, m in moms.items()]
    shifted += [v + n * torch.outer(dev_of["a", a], dev_of["b", b]) for (a, b), v in cross.items()]
    pooled = all_reduce_sum(shifted)
    grid.moments_a, grid.moments_b, grid.cross = {}, {}, {}
    if total:
        for k, s in zip(keys, pooled[: len(keys)], strict=True):
            (grid.moments_a if k[0] == "a" else grid.moments_b)[k[1]] = Moments(
                total, mu[k].to(dev), s.to(dev)
            )
        grid.cross = {c: s.to(dev) for c, s in zip(cross, pooled[len(keys) :], strict=True)}
    return grid


def _t(e: int) -> Tensor:
    return torch.tensor(e)


def reduce_cka(acc: Any) -> Any:
    """Pool a `similarity.MinibatchCKA` over all processes in place (each process's pending partial
    minibatch of >= 4 rows counts as one minibatch): its HSIC sums, rescaled exactly to common
    powers of two per point, then summed; `compute` then gives the grid of every process's
    minibatches, the same on every process."""
    if not active():
        return acc
    st = acc.state()
    keys = [("a", i) for i in range(len(acc.points_a or []))] + [
        ("b", i) for i in range(len(acc.points_b or []))
    ]
    exps = st["exponents"]
    common = _common_exponents(exps, keys)
    sa = [exps.get(("a", i), 0) - common.get(("a", i), 0) for i in range(len(acc.points_a or []))]
    sb = [exps.get(("b", i), 0) - common.get(("b", i), 0) for i in range(len(acc.points_b or []))]
    # HSIC is quadratic in each side's Gram, so a factor 2**-e on the rows is 2**-4e on HSIC(K, K)
    if st["sum_ab"] is not None:
        ea, eb = torch.tensor(sa, device=st["sum_ab"].device), torch.tensor(sb, device=st["sum_ab"].device)
        st["sum_ab"] = torch.ldexp(st["sum_ab"], 2 * ea[:, None] + 2 * eb[None, :])
        st["sum_aa"] = torch.ldexp(st["sum_aa"], 4 * ea)
        st["sum_bb"] = torch.ldexp(st["sum_bb"], 4 * eb)
    names = ["sum_ab", "sum_aa", "sum_bb", "weight", "n_minibatches", "n_rows"]
    values = _shapes_like([st[k] for k in names])
    reduced = all_reduce_sum([v if v is not None else 0.0 for v in values])
    st.update(zip(names, reduced, strict=True))
    if values[0] is None:  # no process saw a minibatch
        st["sum_ab"] = st["sum_aa"] = st["sum_bb"] = None
    st["exponents"] = common
    return acc.load_state(st)


def reduce_similarity(
    acc: Any,
    stats: StatsGrid | None,
    exponents: dict[tuple[str, str], int],
    points: tuple[list[str] | None, list[str] | None],
    counts: Mapping[str, int],
    rows: tuple[int, int, int | None],
) -> tuple[StatsGrid | None, tuple[list[str], list[str]], dict[str, int], tuple[int, int, int | None]]:
    """Pool one streamed similarity grid's pass over all processes (`similarity.grid_from_batches`):
    the minibatch-CKA accumulator `acc` (`reduce_cka`) or, when `acc` is None, the co-moments
    `stats` of "cka_feature" (`reduce_grid`, with their per-point `exponents`), the drop `counts`
    and ``rows = (rows seen, rows kept, widest point)``. Returns (stats, (points_a, points_b),
    counts, rows), the same on every process; points come from any process that had them."""
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, [list(p) if p is not None else None for p in points])
    pa, pb = (next((g[i] for g in gathered if g[i] is not None), None) for i in (0, 1))
    if pa is None or pb is None:
        raise ValueError("no batches on any process: the batches (or the texts' collect) yielded nothing")
    if acc is not None:
        acc.points_a, acc.points_b = acc.points_a or pa, acc.points_b or pb
        reduce_cka(acc)
    else:
        stats = reduce_grid(stats if stats is not None else StatsGrid(pa, pb), exponents)
    seen, kept = all_reduce_sum(list(rows[:2]))
    (widest,) = all_reduce_sum([rows[2] or 0], op="max")
    return stats, (pa, pb), reduce_counts(counts), (int(seen), int(kept), int(widest) or None)


def init_from_env(device: str | torch.device | None = None, backend: str | None = None) -> torch.device:
    """Initialise the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR / MASTER_PORT) and return this process's device.

    `backend` None: nccl when `device` is CUDA (each process on ``cuda:LOCAL_RANK``), gloo
    otherwise; "gloo" with CUDA reduces through the CPU (and lets processes share a GPU: process
    i takes ``cuda:(LOCAL_RANK mod the GPUs seen)``). Without torchrun's variables (or with
    WORLD_SIZE 1) nothing is initialised and `device` comes back. Processes other than rank 0
    show no warnings (the pipelines show progress on rank 0 only)."""
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None, 'nccl' or 'gloo', got {backend!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count() if backend == "gloo" else local)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    if not is_main():
        warnings.simplefilter("ignore")
    return dev
