"""`xlens-align coverage` and `xlens-align similarity`: how two models line up, token and layer."""

from __future__ import annotations

import argparse
from typing import Any

from xlens_align.report.results import similarity_entry

from .options import _at_least, comma_list, positive_number
from .results import coverage_entry
from .session import Run, log

__all__ = ["COVERAGE", "SIMILARITY"]


# -- coverage ----------------------------------------------------------------------------------
def _coverage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify-every",
        type=_at_least(1),
        default=10,
        help="check every k-th row's chunk texts (default 10)",
    )


def coverage(run: Run) -> int:
    from xlens_align.tokens import verify

    o = run.opts
    corpus = run.load_corpus()
    texts = list(corpus.texts if o.texts is None else corpus.texts[: o.texts])
    if o.texts is not None and len(texts) < o.texts:
        run.refuse(f"--texts {o.texts}: corpus {o.corpus!r} has only {len(texts)} passages")
    run.settings["corpus"] = {
        "name": corpus.name,
        "checksum": corpus.checksum,
        "n_texts_fit": len(texts),
        "n_texts_eval": 0,
    }
    run.make_out()
    pair = run.load_pair()
    batch = pair.align(texts)
    cov = batch.coverage()
    checked = range(0, len(batch), o.own["verify_every"])
    problems = verify(batch, pair.a.tokenizer, pair.b.tokenizer, rows=checked)
    n_chars = sum(len(t) for t in texts)
    log(f"\n{len(texts)} texts of {o.corpus!r}, {n_chars:,} characters")
    log(
        f"chunks {int(cov['chunks']):,} ({cov['chunks_per_text']:.1f} per text), "
        f"tokens {int(cov['tokens_a']):,} / {int(cov['tokens_b']):,} (A / B, BOS excluded)"
    )
    log(f"characters inside aligned chunks:         {cov['char_coverage']:.4f}")
    log(f"characters in 1:1-token chunks:           {cov['one_to_one_char_coverage']:.4f}")
    log(f"chunks that are one token on both sides:  {cov['one_to_one_chunk_share']:.4f}")
    log(
        f"tokens per chunk A / B:                   {cov['tokens_per_chunk_a']:.3f} / {cov['tokens_per_chunk_b']:.3f}"
    )
    entry = coverage_entry(
        cov, len(texts), n_chars=n_chars, verified_rows=len(checked), mismatches=len(problems),
        first_mismatches=problems[:5],
    )  # fmt: skip
    log(f"share of A / B tokens that end a chunk:   {entry['coverage_a']:.4f} / {entry['coverage_b']:.4f}")
    log(f"verified every {o.own['verify_every']}th row: {len(problems)} mismatches")
    run.results["coverage"] = entry
    code = run.finish()
    if problems:
        log(f"{len(problems)} chunks spell different texts, first: {problems[0]}")
        return 1
    return code


COVERAGE = {
    "help": "tokenizer alignment of A and B on a corpus (share of 1:1 chunks, tokens per chunk)",
    "description": """\
Aligns the two models' tokenizers on the corpus (every passage, or the first --texts) and reports
how finely they line up: the share of characters in chunks that are one token on both sides,
tokens per chunk, and how many sampled chunks spell different texts (must be 0).
--tiny gives the real Llama 3 (A) and Mistral v1 (B) tokenizers without real weights.

  xlens-align coverage --tiny                 # Llama 3 vs Mistral v1 on the whole pydoc corpus
  xlens-align coverage --a smollm2-135m --b gemma3-270m --texts 50
""",
    "defaults": {"texts": None},
    "args": _coverage_args,
    "run": coverage,
}


# -- similarity --------------------------------------------------------------------------------
def _similarity_args(p: argparse.ArgumentParser) -> None:
    from xlens_align.report.schema import VIEWS
    from xlens_align.similarity import MEASURES

    p.add_argument(
        "--measures",
        type=comma_list("measures", tuple(MEASURES)),
        default=["cka"],
        help=f"similarity measures, comma-separated: {', '.join(MEASURES)} (default cka)",
    )
    p.add_argument(
        "--views",
        type=comma_list("views", VIEWS),
        default=["raw"],
        help="what is compared: raw (the stream), rms (rows over their RMS), standardized (z-scored "
        "dimensions); comma-separated (default raw)",
    )
    p.add_argument(
        "--n-perm",
        type=_at_least(0),
        default=0,
        help="permutation p-value per cell from this many shuffles (default 0: none)",
    )
    p.add_argument(
        "--n-boot",
        type=_at_least(0),
        default=0,
        help="bootstrap interval per cell from this many resamples (default 0: none)",
    )
    p.add_argument(
        "--level", type=positive_number, default=0.95, help="bootstrap interval level (default 0.95)"
    )
    p.add_argument(
        "--control-rows",
        type=_at_least(4),
        default=512,
        help="rows sampled for p-values / intervals (default 512)",
    )


def _all_points(model: Any) -> list[str]:
    return ["embed", *(f"resid_post.{i}" for i in range(model.n_layers)), "final"]


def similarity(run: Run) -> int:
    import xlens_align as xa

    o, own = run.opts, run.opts.own
    if not 0 < own["level"] < 1:
        run.refuse(f"--level {own['level']}: expected a number in (0, 1)")
    texts = run.texts(eval_texts=False).fit
    run.make_out()
    pair = run.load_pair()
    pts_a, pts_b = run.points(_all_points, spaced_extra=("embed",))
    kw = dict(batch_size=o.batch_size, drop_first=o.drop_first, progress=o.progress)
    # torchrun: streamed measures without controls pool each process's share of the texts
    pool = xa.distributed.active() and set(own["measures"]) <= {"cka", "cka_feature"}
    pool = pool and not (own["n_perm"] or own["n_boot"] or "standardized" in own["views"])
    texts = xa.distributed.shard(texts, o.batch_size) if pool else texts
    batches = list(xa.collect(pair, texts, pts_a, pts_b, **kw)) if texts else []
    entries = []
    controls = dict(
        n_perm=own["n_perm"], n_boot=own["n_boot"], level=own["level"], control_rows=own["control_rows"]
    )
    cells = [(m, v, f) for m in own["measures"] for v in own["views"] for f in (True, False)]
    for measure, view, filtered in cells:
        massive, label = (o.massive, "filtered") if filtered else (None, "unfiltered")
        grid = xa.similarity.grid_from_batches(
            batches, measure, pts_a, pts_b, massive=massive, seed=o.seed, progress=o.progress, view=view,
            model_a=pair.a.name, model_b=pair.b.name, pool=pool, **controls,
        )  # fmt: skip
        entries.append(
            similarity_entry(grid, view=view, filtered=filtered, label=f"{measure}, {view}, {label}")
        )
        log(
            f"\n{measure} ({view}, {label}, {grid.n_tokens} rows, drop_first={o.drop_first}, massive={massive}, "
            f"dropped {grid.extra['filtered']})"
        )
        for a, (b, v) in grid.best_match().items():
            log(f"  {a:>14} -> {b:<14} {v:.3f}")
    run.results["similarity"] = entries
    return run.finish()


SIMILARITY = {
    "help": "similarity of every point of A with every point of B (CKA, SVCCA, ...; p-values, intervals)",
    "description": """\
Collects paired activations of A and B on the training passages once and computes a layer grid
for each measure, with the massive-row filter (--massive, default 5 x the median row norm) and
without it. Points: embed, every resid_post and final unless --points / --depths / --points-a
say otherwise. --n-perm / --n-boot add a permutation p-value / bootstrap interval per cell.

  xlens-align similarity                               # SmolLM2 vs Gemma 3, CKA, 32 passages
  xlens-align similarity --tiny --measures cka,svcca --n-perm 50 --texts 8
""",
    "defaults": {"texts": 32, "max_chars": 400, "massive": 5.0},
    "args": _similarity_args,
    "run": similarity,
}
