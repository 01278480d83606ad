"""`xlens-align fit` and `xlens-align effects`: maps between chosen points, and what they do in B."""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any

from xlens_align.report.results import functional_entry

from .options import KIND_PARAMS, _at_least
from .results import effect_row
from .session import Run, log

__all__ = ["EFFECTS", "FIT", "fresh_maps", "load_maps", "map_files_arg"]


def map_files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--map-files",
        nargs="+",
        metavar="PATH",
        help="saved maps (xlens-align fit writes them) instead of fitting new ones",
    )


def fresh_maps(
    run: Run, texts: list[str], sources: list[str], targets: list[str], kind: str, pairs: Any = None
) -> dict[tuple[str, str], Any]:
    """`kind` maps fitted on `texts` by `fitting.fit_grid` (one streamed pass), keyed (source, target)."""
    import xlens_align as xa

    o = run.opts
    log(f"fitting {kind} maps on {len(texts)} passages")
    return xa.fitting.fit_grid(
        run.pair, texts, sources, targets, kind=kind, pairs=pairs, batch_size=o.batch_size,
        drop_first=o.drop_first, massive=o.massive, progress=o.progress, **KIND_PARAMS[kind],
    )  # fmt: skip


def load_maps(run: Run, paths: list[str]) -> list[tuple[str, str, Any]]:
    """(source, target, map) of each saved map; a file that does not load, or that was fit on
    other models, exits 2 naming --map-files and the path."""
    import xlens_align as xa

    out = []
    for path in paths:
        try:
            m = xa.maps.load(path, a=run.pair.a, b=run.pair.b)
        except (OSError, ValueError, TypeError) as e:
            run.refuse(f"--map-files {path!r}: {e}")
        src, tgt = m.provenance.get("source"), m.provenance.get("target")
        if not (isinstance(src, str) and isinstance(tgt, str)):
            run.refuse(f"--map-files {path!r}: the map records no source / target point")
        out.append((src, tgt, m))
    return out


def _file_name(kind: str, src: str, tgt: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}_{src}_to_{tgt}") + ".safetensors"


# -- fit ---------------------------------------------------------------------------------------
def fit(run: Run) -> int:
    import xlens_align as xa

    o = run.opts
    texts = run.texts()
    out = run.make_out()
    pair = run.load_pair()
    pts_a, pts_b = run.points(lambda m: [m.point_at_depth(0.5)])
    pairs = run.pairs()
    held = xa.activations.collect_all(
        pair, texts.held, pts_a, pts_b, batch_size=o.batch_size, drop_first=o.drop_first, massive=o.massive,
        progress=o.progress,
    )  # fmt: skip
    rows = []
    for kind in o.maps:
        maps = fresh_maps(run, texts.fit, pts_a, pts_b, kind, pairs=pairs)
        for (src, tgt), m in maps.items():
            score = m.score(held.a[src], held.b[tgt])
            path = out / "maps" / _file_name(kind, src, tgt)
            path = m.save(path) if run.writes else path
            rows.append({"map_kind": kind, "source": src, "target": tgt, "path": str(path), "score": score})
            log(
                f"{kind:11s} {src} -> {tgt}: held-out R^2 {score['r2']:.3f}, cosine {score['cosine']:.3f} -> {path}"
            )
    run.results["maps"] = rows
    return run.finish()


FIT = {
    "help": "fit maps from points of A to points of B and save them as map files",
    "description": """\
Fits each --maps kind (affine: ridge with alpha by validation; procrustes: scaled rotation;
lowrank: rank 64; cca: 64 components) for each point pair from one streamed pass over the
training passages, scores it on held-out passages (R^2, cosine) and saves it to
<out>/maps/<kind>_<source>_to_<target>.safetensors. Pairs: the i-th point of A with the i-th of
B (a single point on one side pairs with every point of the other); default the middle block
of each model.

  xlens-align fit --tiny --maps affine,procrustes --depths 0.25,0.5,0.75
  xlens-align fit --points-a resid_post.12 --points-b resid_post.7 --out out/maps12
""",
    "defaults": {"maps": ["affine", "procrustes"]},
    "args": None,
    "run": fit,
}


# -- effects -----------------------------------------------------------------------------------
def _effects_args(p: argparse.ArgumentParser) -> None:
    map_files_arg(p)
    p.add_argument(
        "--injection", action="store_true", help="also the embedding-injection baseline from each point of A"
    )
    p.add_argument(
        "--n-boot",
        type=_at_least(0),
        default=0,
        help="bootstrap intervals over texts from this many resamples (default 0)",
    )
    p.add_argument(
        "--ablation-texts",
        type=_at_least(1),
        default=8,
        help="training passages after --texts whose mean is the ablation (default 8)",
    )


def _boot_kw(run: Run, fn: Any) -> dict[str, Any]:
    n_boot = run.opts.own["n_boot"]
    if not n_boot:
        return {}
    if "n_boot" not in inspect.signature(fn).parameters:
        run.refuse("--n-boot: this version of xlens_align.effects has no bootstrap intervals")
    return {"n_boot": n_boot, "seed": run.opts.seed}


def _injection(run: Run, pair: Any, texts: Any, sources: list[str]) -> dict[tuple[str, str], Any]:
    """The embedding-injection baseline from each source: {(source, "embed"): map}."""
    import xlens_align as xa

    o = run.opts
    return {
        (src, "embed"): xa.fitting.fit_injection(
            pair, source=src, texts=texts.fit, batch_size=o.batch_size, drop_first=o.drop_first,
            massive=o.massive, progress=o.progress, alpha="cv",
        )  # fmt: skip
        for src in sources
    }


def effects(run: Run) -> int:
    import xlens_align as xa

    o = run.opts
    texts = run.texts(n_ablation=o.own["ablation_texts"])
    run.make_out()
    pair = run.load_pair()
    common = dict(
        ablation="mean", ablation_texts=texts.ablation, batch_size=o.batch_size, drop_first=o.drop_first,
        massive=o.massive, progress=o.progress,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    if o.own["map_files"]:
        kw = {**common, **_boot_kw(run, xa.effects.measure)}
        for src, tgt, m in load_maps(run, o.own["map_files"]):
            e = xa.effects.measure(pair, m, source=src, target=tgt, texts=texts.held, **kw)
            rows.append(effect_row(pair, e))
        if o.own["injection"]:
            sources = list(dict.fromkeys(r["source"] for r in rows))
            inj = xa.effects.grids(pair, {"injection": _injection(run, pair, texts, sources)}, texts.held, **kw)
            rows += [effect_row(pair, e) for e in inj["injection"].effects.values()]
    else:
        sources, targets = run.points(lambda m: m.spaced_points(4))
        sets: dict[str, Any] = {kind: fresh_maps(run, texts.fit, sources, targets, kind) for kind in o.maps}
        if o.own["injection"]:
            sets["injection"] = _injection(run, pair, texts, sources)
        n = sum(len(m) for m in sets.values())
        log(f"patching {n} maps ({', '.join(sets)}) into B over {len(texts.held)} held-out passages, one pass")
        kw = {**common, **_boot_kw(run, xa.effects.grids)}
        grids = xa.effects.grids(pair, sets, texts.held, sources=sources, **kw)
        run.results["functional"] = [functional_entry(grids[kind], kind) for kind in o.maps]
        for kind, g in grids.items():
            rows += [effect_row(pair, e) for e in g.effects.values()]
            log(f"\n{kind} maps: B clean CE {g.ce_clean:.3f}, {g.n_tokens} scored predictions")
            log(g.table().text)
    run.results["effects"] = rows
    return run.finish()


EFFECTS = {
    "help": "patch A's mapped activations into B: the functional grid (loss recovered, KL, top-1)",
    "description": """\
Fits each --maps kind for every (point of A, point of B) pair on the training passages (or
loads --map-files), writes the mapped activations into B over held-out passages and measures
next-token loss recovered against mean-ablation at the same point (the mean over the
--ablation-texts passages after the training ones), KL to clean B and top-1 agreement. Points:
4 evenly spaced resid_post points of each model unless --points / --depths / --points-a say
otherwise. --injection adds the embedding-injection baseline; --n-boot intervals over texts.

  xlens-align effects                          # SmolLM2 -> Gemma 3, 4 x 4 points, affine maps
  xlens-align effects --tiny --texts 8 --eval-texts 4 --maps affine,procrustes --injection
  xlens-align effects --map-files out/fit/maps/*.safetensors
""",
    "defaults": {"texts": 32, "eval_texts": 8, "max_chars": 300},
    "args": _effects_args,
    "run": effects,
}
