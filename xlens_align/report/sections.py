"""One function per report section: validated results in, (anchor, title, body HTML) out.

Each returns None when its results are absent, so the page holds only what the run computed.
Numbers are shown as results.json holds them; nothing is recomputed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .figures import depth_figure, heatmap
from .page import figure_html, kv_table, table, text

__all__ = ["RENDERERS", "VIEW_NOTES"]

#: what each similarity view is, said beside its heatmaps
VIEW_NOTES = {
    "raw": (
        "Raw stream: the residual stream as it is. A few massive dimensions (values of 1e3-1e5 on "
        "the first tokens) can dominate linear CKA; compare with the filtered and normalised views."
    ),
    "rms": (
        "RMS-normalised: each row divided by its root-mean-square, what the next layer's "
        "RMSNorm reads (before its gain)."
    ),
    "standardized": (
        "Standardised: each dimension centred and scaled to unit variance over the rows, so every "
        "dimension weighs the same."
    ),
}
VIEW_TITLES = {"raw": "raw stream", "rms": "RMS-normalised", "standardized": "standardised"}

_EFFECT_COLUMNS = (
    "label",
    "source",
    "target",
    "map_kind",
    "depth_a",
    "depth_b",
    "ce_clean",
    "ce_patched",
    "ce_ablated",
    "recovered",
    "recovered_ci",
    "kl",
    "kl_ci",
    "top1_agreement",
    "top1_ci",
    "n_tokens",
    "note",
)


def _models(res: Mapping[str, Any]) -> tuple[str, str]:
    s = res.get("settings") or {}
    names = []
    for side in ("a", "b"):
        info = s.get(side)
        src = info.get("source") if isinstance(info, Mapping) else None
        names.append(str(src) if src else side.upper())
    return names[0], names[1]


def settings(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    s = res.get("settings")
    if s is None:
        return None
    parts = []
    sides = {k: s[k] for k in ("a", "b") if isinstance(s.get(k), Mapping)}
    if sides:
        keys = list(dict.fromkeys(k for v in sides.values() for k in v))
        parts.append(
            table(
                ("model", *(k.upper() for k in sides)),
                [(k, *(v.get(k, "") for v in sides.values())) for k in keys],
            )
        )
    rest = {k: v for k, v in s.items() if k not in sides}
    if rest:
        parts.append(kv_table(rest))
    head = f"<p>command: <code>{text(res.get('command', ''))}</code></p>" if res.get("command") else ""
    return "settings", "Settings", head + "\n".join(parts)


def coverage(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    c = res.get("coverage")
    if c is None:
        return None
    note = (
        '<p class="note">How the two tokenizers\' cuts of the same texts line up: aligned chunks '
        "are the rows every comparison uses.</p>"
    )
    return "coverage", "Alignment coverage", note + kv_table(c)


def _best(entry: Mapping[str, Any]) -> str:
    best = entry.get("best_match")
    if not best:
        return ""
    return "<p>Best match in B for each point of A:</p>" + table(
        ("point of A", "best point of B", entry["measure"]), [(pa, pb, v) for pa, (pb, v) in best.items()]
    )


def similarity(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    entries = res.get("similarity")
    if not entries:
        return None
    model_a, model_b = _models(res)
    groups: dict[tuple[str, bool], list[tuple[int, Mapping[str, Any]]]] = {}
    for i, e in enumerate(entries):
        groups.setdefault((e["view"], e["filtered"]), []).append((i, e))
    order = sorted(groups, key=lambda g: (list(VIEW_NOTES).index(g[0]), not g[1]))
    parts = []
    for view, filtered in order:
        rows = "filtered rows (row filters applied)" if filtered else "all rows (no row filter)"
        parts.append(f"<h3>{text(VIEW_TITLES[view])}, {rows}</h3>")
        parts.append(f'<p class="note">{text(VIEW_NOTES[view])}</p>')
        for i, e in groups[view, filtered]:
            label = (
                e.get("label")
                or f"{e['measure']} ({VIEW_TITLES[view]}, {'filtered' if filtered else 'unfiltered'})"
            )
            fig = heatmap(
                e["values"],
                e["points_a"],
                e["points_b"],
                measure=e["measure"],
                title=f"{label}: {model_a} vs {model_b}, {e['n_rows']:,} rows",
                n_rows=e["n_rows"],
                model_a=model_a,
                model_b=model_b,
                extra={k: e.get(k) for k in ("p_values", "ci_low", "ci_high")},
                view=view,
            )
            parts.append(figure_html(fig, f"similarity-{i}"))
            parts.append(_best(e))
    return "similarity", "Similarity heatmaps", "\n".join(parts)


def functional(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    grids = res.get("functional")
    if not grids:
        return None
    model_a, model_b = _models(res)
    kinds = ", ".join(text(f["map_kind"]) for f in grids)
    note = (
        f'<p class="note">One grid per map kind ({kinds}). Each cell: a map from a point of '
        f"{text(model_a)} (row) written into a point of {text(model_b)} (column); recovered = (CE "
        "ablated - CE patched) / (CE ablated - CE clean), KL(clean || patched) per prediction (lower "
        "is better), top-1 = share of predictions whose argmax matches the clean run.</p>"
    )
    parts = [note]
    for i, f in enumerate(grids):
        for key, measure, low in (
            ("recovered", "recovered", False),
            ("kl", "KL", True),
            ("top1_agreement", "top-1", False),
        ):
            fig = heatmap(
                f[key],
                f["points_a"],
                f["points_b"],
                measure=measure,
                title=f"{measure}: {f['map_kind']} maps, {model_a} -> {model_b}",
                model_a=model_a,
                model_b=model_b,
                lower_is_better=low,
            )
            parts.append(figure_html(fig, f"functional-{i}-{key}"))
    return "functional", "Functional heatmap", "\n".join(parts)


def _effect_table(rows: list[Mapping[str, Any]], extra: tuple[str, ...] = ()) -> str:
    cols = [c for c in (*_EFFECT_COLUMNS, *extra) if any(r.get(c) not in (None, "") for r in rows)]
    return table(cols, [[r.get(c, "") for c in cols] for r in rows])


def effects(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    rows = res.get("effects")
    if not rows:
        return None
    _, model_b = _models(res)
    note = (
        '<p class="note">Mapped patches by depth: x is the relative depth of the point of '
        f"{text(model_b)} written (0 = embeddings, 1 = last block), one line per map kind. The "
        "embedding-injection baseline (dashed) writes A's mapped activations into B's embeddings; "
        "its recovered fraction is relative to ablating the embeddings, so compare its KL and "
        "top-1 with the maps', not only recovered.</p>"
    )
    fig = figure_html(depth_figure(rows, model_b=model_b), "effects-depth")
    return "effects", "Effects by depth", note + fig + _effect_table(rows)


def adapter(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    rows = res.get("adapter")
    if not rows:
        return None
    note = '<p class="note">Maps trained through B (the adapter), by training objective.</p>'
    return "adapter", "Adapter", note + _effect_table(rows, ("objective",))


def generations(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    rows = res.get("generations")
    if not rows:
        return None
    cols = ("prompt", "map_kind", "source", "target", "clean", "patched", "ablated")
    body = table(cols, [[r[c] for c in cols] for r in rows], pre=("prompt", "clean", "patched", "ablated"))
    note = (
        '<p class="note">B\'s greedy continuation of each prompt: clean, with the mapped patch '
        "written at the prompt's aligned positions, and with the same positions ablated.</p>"
    )
    return "generations", "Generations", note + body


def maps(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    rows = res.get("maps")
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in (r.get("score") or {})))
    cols = ("map_kind", "source", "target", *keys, "path")
    data = [
        [
            r["map_kind"],
            r["source"],
            r["target"],
            *((r.get("score") or {}).get(k, "") for k in keys),
            r.get("path") or "",
        ]
        for r in rows
    ]
    note = '<p class="note">Fitted maps and their held-out scores.</p>'
    return "maps", "Maps", note + table(cols, data)


def checks(res: Mapping[str, Any]) -> tuple[str, str, str] | None:
    c = res.get("checks")
    if c is None:
        return None
    return "checks", "Checks", kv_table(c)


RENDERERS = (settings, coverage, similarity, functional, effects, adapter, generations, maps, checks)
