"""results.json: the one result file of every subcommand (schema in `xlens_align.report.schema`).

Entries come from `xlens_align.report.results` (which reads the library's own records:
`Effect.as_dict`, `Grid` and `PatchGrid` attributes); this module adds what the command line
needs: the run's model records, "injection" as the map kind of the embedding-injection baseline,
and finite numbers only (a non-finite value becomes null and its dict gets a ``note`` naming the
key). The file is written through `files.atomic_path`: an interrupted run leaves no half-written
file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["coverage_entry", "effect_row", "finite", "model_info", "write"]

_INTERVAL_KEYS = ("recovered_ci", "kl_ci", "top1_ci", "ci_level")


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None; a dict holding one directly gets a
    ``note`` naming the key (after any note it had)."""
    if hasattr(obj, "tolist") and callable(obj.tolist):  # tensors and arrays
        return finite(obj.tolist())
    if isinstance(obj, dict):
        out = {str(k): finite(v) for k, v in obj.items()}
        bad = [
            f"{k} is not finite ({v})"
            for k, v in obj.items()
            if isinstance(v, float) and not math.isfinite(v)
        ]
        if bad:
            out["note"] = "; ".join([*([str(obj["note"])] if obj.get("note") else []), *bad])
        return out
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def coverage_entry(cov: dict[str, float], n_texts: int, **extra: Any) -> dict[str, Any]:
    """The ``coverage`` section from `AlignedBatch.coverage()`; coverage_a / coverage_b: the share
    of A's / B's text tokens that end an aligned chunk (1 / tokens per chunk)."""
    return {
        "n_texts": n_texts,
        **cov,
        "coverage_a": 1 / cov["tokens_per_chunk_a"],
        "coverage_b": 1 / cov["tokens_per_chunk_b"],
        **extra,
    }


def model_info(source: str, model: Any) -> dict[str, Any]:
    return {
        "source": source,
        "name": getattr(model, "name", str(source)),
        "family": getattr(model, "family", None),
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "vocab": getattr(model, "vocab_size", None),
    }


def effect_row(pair: Any, effect: Any, **extra: Any) -> dict[str, Any]:
    """`report.results.effect_row` (Effect.as_dict() plus relative depths); the
    embedding-injection baseline's map_kind is "injection"."""
    from xlens_align.report.results import effect_row as row

    if effect.mode == "inject":
        extra = {"map_kind": "injection", **extra}
    out = row(effect, pair, **extra)
    for key in _INTERVAL_KEYS:  # intervals only when they were computed
        if out.get(key) is None or (isinstance(out[key], float) and math.isnan(out[key])):
            out.pop(key, None)
    return out


def write(out_dir: Path, results: dict[str, Any]) -> Path:
    """Check `results` against the schema and write ``<out_dir>/results.json`` atomically."""
    from xlens_align.files import atomic_path
    from xlens_align.report.results import dumps

    path = Path(out_dir) / "results.json"
    text = dumps(finite(results))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
