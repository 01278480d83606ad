"""HTML pieces of the report: escaped text, number formatting, tables, sections, the page.

Everything the page shows passes through `text` (html.escape) or a plotly figure; plotly.js is
embedded once, in the page's head, and every figure is a div that draws with it (no network).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["figure_html", "fmt", "kv_table", "page", "section", "table", "text"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td pre { margin: 0; white-space: pre-wrap; max-width: 28em; font-size: .95em; }
p.note { color: #555; max-width: 60em; } nav a { margin-right: 1em; }
"""


def text(value: Any) -> str:
    """`value` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to `digits` significant digits ("nan" / "inf" spelled out)."""
    if isinstance(value, bool) or value is None:
        return text("" if value is None else str(value).lower())
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return text(f"{value:.{digits}g}")
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value)
    return text(value)


def _cell(value: Any, pre: bool = False) -> str:
    if pre:
        return f"<td><pre>{text(value)}</pre></td>"
    num = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="num">{fmt(value)}</td>' if num else f"<td>{fmt(value)}</td>"


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", pre: Sequence[str] = ()
) -> str:
    """An HTML table; columns named in `pre` keep their whitespace (generated text)."""
    head = "".join(f"<th>{text(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(v, c in pre) for c, v in zip(columns, r, strict=True)) + "</tr>" for r in rows
    )
    attr = f' class="{text(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flatten(v, f"{key}.")
        else:
            out.append((key, v if not isinstance(v, Mapping) else ""))
    return out


def kv_table(d: Mapping[str, Any], cls: str = "") -> str:
    """A two-column table of `d`'s entries, nested objects flattened to dotted keys."""
    return table(("key", "value"), _flatten(d), cls=cls)


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{text(anchor)}"><h2>{text(title)}</h2>\n{body}\n</section>'


def figure_html(fig: Any, div_id: str) -> str:
    """A plotly figure as a div drawn by the page's one copy of plotly.js."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"responsive": True})


def page(title: str, sections: Sequence[tuple[str, str, str]], subtitle: str = "") -> str:
    """The whole HTML document: plotly.js once in <head>, a contents line, then the sections
    given as (anchor, title, body HTML)."""
    from plotly.offline import get_plotlyjs

    nav = " ".join(f'<a href="#{text(a)}">{text(t)}</a>' for a, t, _ in sections)
    body = "\n".join(section(a, t, b) for a, t, b in sections)
    sub = f"<p>{text(subtitle)}</p>" if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{text(title)}</title>\n<style>{_CSS}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        f"<h1>{text(title)}</h1>\n{sub}\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )
