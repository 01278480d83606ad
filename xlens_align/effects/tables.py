"""Results of mapped patches: `Effect` (one patch) and `table` (many, as text and rows)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from ..rows import RowFilter
from ..scoring import Sums, recovered

__all__ = ["Effect", "EffectTable", "make_effect", "table"]


@dataclass
class Effect:
    """What a mapped patch from A's `source` to B's `target` does to B's next-token predictions.

    ce_clean / ce_patched / ce_ablated: mean next-token cross-entropy (nats) of B unpatched,
    patched, and ablated at the same point and positions. recovered: (CE_ablated - CE_patched) /
    (CE_ablated - CE_clean); NaN with ``recovered_undefined=True`` and a `note` when there is no
    gap. kl: mean KL(clean || patched) per evaluated prediction; top1_agreement: share of
    predictions whose argmax matches the clean run's; kl_ablated / top1_ablated: the same for the
    ablated run. n_tokens: scored predictions (see `plan`); n_patched: positions written;
    n_texts: texts; rows: the row filter settings (`rows.RowFilter.describe`); filtered: how many
    aligned rows each filter dropped. mode: "inject" for the embedding-injection baseline (target
    "embed"), else "patch". recovered_ci / kl_ci / top1_ci: (low, high) percentile bootstrap
    intervals over texts at `ci_level` from `n_boot` replicates (`effects.intervals`); None
    without a bootstrap (n_boot=0) or when the number is undefined.
    """

    source: str
    target: str
    map_kind: str
    ce_clean: float
    ce_patched: float
    ce_ablated: float
    recovered: float
    kl: float
    top1_agreement: float
    n_tokens: int
    n_patched: int
    ablation: str
    kl_ablated: float = math.nan
    top1_ablated: float = math.nan
    n_texts: int = 0
    rows: dict[str, Any] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    recovered_undefined: bool = False
    note: str = ""
    recovered_ci: tuple[float, float] | None = None
    kl_ci: tuple[float, float] | None = None
    top1_ci: tuple[float, float] | None = None
    n_boot: int = 0
    ci_level: float = math.nan

    @property
    def mode(self) -> str:
        return "inject" if self.target == "embed" else "patch"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode": self.mode}


def make_effect(
    source: str,
    target: str,
    kind: str,
    clean: Sums,
    patched: Sums,
    ablated: Sums,
    *,
    n_patched: int,
    ablation: str,
    n_texts: int,
    rows: RowFilter,
    filtered: dict[str, int],
    stacklevel: int = 2,
) -> Effect:
    """An `Effect` from the three runs' sums; `recovered`'s warnings point `stacklevel` frames up."""
    if clean.n == 0:
        raise ValueError(
            "no prediction to score: every row's patched positions are at its end or were dropped "
            f"(row filters {rows.describe()}, dropped {filtered}); use longer texts or looser filters"
        )
    ce_c, ce_p, ce_a = clean.mean("nll"), patched.mean("nll"), ablated.mean("nll")
    rec, undefined, note = recovered(ce_c, ce_p, ce_a, target, stacklevel=stacklevel + 1)
    return Effect(
        source=source,
        target=target,
        map_kind=kind,
        ce_clean=ce_c,
        ce_patched=ce_p,
        ce_ablated=ce_a,
        recovered=rec,
        kl=patched.mean("kl"),
        top1_agreement=patched.mean("top1"),
        n_tokens=patched.n,
        n_patched=n_patched,
        ablation=ablation,
        kl_ablated=ablated.mean("kl"),
        top1_ablated=ablated.mean("top1"),
        n_texts=n_texts,
        rows=rows.describe(),
        filtered=dict(filtered),
        recovered_undefined=undefined,
        note=note,
    )


class EffectTable(NamedTuple):
    """`text`: a plain-text table; `rows`: one dict per effect (same columns)."""

    text: str
    rows: list[dict[str, Any]]

    def __str__(self) -> str:
        return self.text


_COLUMNS = (
    ("source", "source"),
    ("target", "target"),
    ("mode", "mode"),
    ("map", "map_kind"),
    ("ablation", "ablation"),
    ("ce_clean", "ce_clean"),
    ("ce_patched", "ce_patched"),
    ("ce_ablated", "ce_ablated"),
    ("recovered", "recovered"),
    ("kl", "kl"),
    ("top1", "top1_agreement"),
    ("n_tokens", "n_tokens"),
    ("n_patched", "n_patched"),
)
#: shown when any effect carries bootstrap intervals
_CI_COLUMNS = (("recovered_ci", "recovered_ci"), ("kl_ci", "kl_ci"), ("top1_ci", "top1_ci"))


def table(effects: Sequence[Effect] | Mapping[Any, Effect], *, digits: int = 4) -> EffectTable:
    """Render effects (mapped patches and embedding injections alike) as a plain-text table and a
    list of dicts. Undefined `recovered` values are marked ``nan*`` and explained under the table;
    when any effect has bootstrap intervals, columns ``recovered_ci`` / ``kl_ci`` / ``top1_ci``
    follow ("-" where there is none)."""
    effs = list(effects.values()) if isinstance(effects, Mapping) else list(effects)
    for i, e in enumerate(effs):
        if not isinstance(e, Effect):
            raise TypeError(f"effects[{i}] must be an Effect, got {type(e).__name__}")
    columns = _COLUMNS + (_CI_COLUMNS if any(e.n_boot for e in effs) else ())
    rows = []
    for e in effs:
        d = e.as_dict()
        rows.append({col: d[key] for col, key in columns} | {"note": e.note})
    cells = [[col for col, _ in columns]]
    for e, r in zip(effs, rows, strict=True):
        line = []
        for col, _ in columns:
            v = r[col]
            if col.endswith("_ci"):
                s = "-" if v is None else f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"
            elif isinstance(v, float):
                s = f"{v:.{digits}f}"
                if col == "recovered" and e.recovered_undefined:
                    s = "nan*"
            else:
                s = str(v)
            line.append(s)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    numeric = {col for col, key in columns if key.startswith(("ce_", "recovered", "kl", "top1", "n_"))}
    lines = []
    for k, c in enumerate(cells):
        parts = [
            s.rjust(w) if (columns[i][0] in numeric and k > 0) else s.ljust(w)
            for i, (s, w) in enumerate(zip(c, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({e.note for e in effs if e.note})
    lines += [f"* {n}" for n in notes]
    return EffectTable("\n".join(lines), rows)
