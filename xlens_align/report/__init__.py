"""One self-contained HTML report per run, drawn from the run's results.json.

`build(results)` turns a results dict (the schema is in `schema`) into the HTML text; `write(dir)`
reads ``dir/results.json`` and writes ``dir/report.html`` atomically. The page embeds plotly.js
once and needs no network to view. Every number it shows comes from the results; sections the
run did not compute are left out. `results` has the helpers that turn library objects (a
similarity `Grid`, a functional `PatchGrid`, an `Effect`) into results.json entries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_path
from . import results
from .page import page
from .schema import SCHEMA, SECTIONS, check
from .sections import RENDERERS

__all__ = ["SCHEMA", "build", "check", "results", "write"]


def build(results: Mapping[str, Any], *, title: str | None = None) -> str:
    """The report's HTML text for a results dict (ValueError naming the section and key that is
    malformed)."""
    res = check(results)
    parts = [s for s in (section(res) for section in RENDERERS) if s is not None]
    if not parts:
        raise ValueError(f"results hold no section to report: expected at least one of {list(SECTIONS)}")
    s = res.get("settings") or {}
    models = [
        str(s[k].get("source")) for k in ("a", "b") if isinstance(s.get(k), Mapping) and s[k].get("source")
    ]
    default = "xlens-align report" + (f": {' vs '.join(models)}" if models else "")
    sub = f"command: {res['command']}" if res.get("command") else ""
    return page(title or default, parts, subtitle=sub)


def write(results_dir: str | Path) -> Path:
    """Read ``results_dir/results.json``, write ``results_dir/report.html`` (atomically: a failed
    write leaves no report.html, and an older one untouched) and return its path."""
    d = Path(results_dir)
    src = d / "results.json"
    if not src.is_file():
        raise FileNotFoundError(
            f"no results to report: {src} does not exist (run the command that writes it)"
        )
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{src} is not valid JSON: {e}") from None
    try:
        html = build(data)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    out = d / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
