"""`xlens-align demo`: the main job end to end on one pair, printed and written as one report."""

from __future__ import annotations

from typing import Any

from xlens_align.report.results import generation_row, similarity_entry

from .checks import PROMPT, forward_check, parity
from .results import coverage_entry, effect_row
from .session import Run, log

__all__ = ["DEFAULTS", "HELP", "run"]

HELP = "the main job: checks, alignment, CKA grids, maps, patching and generation on one pair"
DESCRIPTION = """\
Checks both models against Hugging Face, aligns the two tokenizers on the corpus, computes CKA
between K evenly spaced points of each model (with and without the massive-row filter), fits
affine / Procrustes / low-rank maps between their middle points (scored on held-out passages),
patches the mapped activations into B (loss recovered, KL, top-1; embedding-injection baseline)
and generates text under the patch. Default models: SmolLM2-135M (A) and Gemma 3 270M (B), both
packaged; --tiny runs tiny random-init Llama / Mistral models in seconds.

  xlens-align demo                      # writes out/demo/results.json and out/demo/report.html
  xlens-align demo --tiny --texts 16 --eval-texts 6 --max-chars 200
"""
DEFAULTS = {"texts": 48, "eval_texts": 16, "max_chars": 400, "points": 6, "massive": 5.0}
GEN_PROMPT = "The capital of France is Paris. The capital of Germany is"


def _checks(run: Run, pair: Any) -> None:
    checks: dict[str, Any] = {}
    for side, m in (("a", pair.a), ("b", pair.b)):
        fc = forward_check(m)
        log(
            f"{side.upper()}: forward check vs HF: max|logits diff| {fc['logits_diff']:.1e}, "
            f"max|final - hidden_states[-1]| {fc['final_diff']:.1e}"
        )
        log(f"{side.upper()}: {PROMPT!r} -> {fc['next_token']!r}")
        par = parity(m)
        if par is not None:
            log(
                f"{side.upper()}: max |bridge - HF| per point kind: "
                + ", ".join(f"{k} {v:.1e}" for k, v in par.items())
            )
        checks[side] = fc if par is None else {**fc, "parity": par}
    run.results["checks"] = checks


def run(run: Run) -> int:
    import torch

    import xlens_align as xa

    o = run.opts
    texts = run.texts()
    run.make_out()
    pair = run.load_pair()
    _checks(run, pair)

    log("\n== text and alignment")
    train, held = texts.fit, texts.held
    cov = pair.align(train).coverage()
    log(
        f"{len(train)} train / {len(held)} held-out passages of {o.corpus!r}; {int(cov['chunks'])} aligned chunks, "
        f"{cov['one_to_one_char_coverage']:.3f} of characters in 1:1-token chunks, "
        f"{cov['tokens_per_chunk_a']:.2f} / {cov['tokens_per_chunk_b']:.2f} tokens per chunk (A / B)"
    )
    run.results["coverage"] = coverage_entry(cov, len(train))

    log(
        f"\n== paired activations (one streamed pass per split; drop_first={o.drop_first}: the first text "
        "tokens, where massive activations sit, are left out)"
    )
    pts_a, pts_b = run.points(
        lambda m: ["embed", *m.spaced_points(DEFAULTS["points"])], spaced_extra=("embed",)
    )
    kw = dict(batch_size=o.batch_size, progress=o.progress, drop_first=o.drop_first)
    tr = list(xa.collect(pair, train, pts_a, pts_b, **kw))
    ho = list(xa.collect(pair, held, pts_a, pts_b, **kw))
    n_tr, n_ho = sum(pb.n for pb in tr), sum(pb.n for pb in ho)
    log(f"{n_tr} train rows, {n_ho} held-out rows at {len(pts_a)} x {len(pts_b)} points")
    for opt, n, need in (("--texts", n_tr, 4), ("--eval-texts", n_ho, 2)):
        if n < need:
            run.refuse(
                f"{opt} {getattr(o, opt[2:].replace('-', '_'))} with --max-chars {o.max_chars} leaves {n} "
                f"aligned rows after the first token of each text is dropped; the demo needs at least {need}: "
                "raise --max-chars or the number of passages"
            )

    log("\n== CKA between every point pair (debiased minibatch CKA), with and without the massive-row filter")
    sims = []
    for label, massive in (("filtered", o.massive), ("unfiltered", None)):
        g = xa.similarity.grid_from_batches(
            tr, "cka", pts_a, pts_b, massive=massive, model_a=pair.a.name, model_b=pair.b.name
        )
        sims.append((label, g))
        log(f"{label}: {g.n_tokens} rows")
    best = sims[0][1].best_match()
    log(
        "best-matching point of B for each point of A (filtered): "
        + ", ".join(f"{a}->{b} ({v:.2f})" for a, (b, v) in best.items())
    )
    run.results["similarity"] = [
        similarity_entry(g, view="raw", filtered=label == "filtered", label=f"cka, {label}")
        for label, g in sims
    ]

    log("\n== alignment maps (fit on train, scored on held-out)")
    src, tgt = pts_a[len(pts_a) // 2], pts_b[len(pts_b) // 2]
    fit_rows, held_rows = xa.activations.concat(tr), xa.activations.concat(ho)
    X, Y = fit_rows.a[src], fit_rows.b[tgt]
    Xh, Yh = held_rows.a[src], held_rows.b[tgt]
    g = torch.Generator().manual_seed(o.seed)
    maps, fitted = [], {}
    for name, m in (
        ("affine(cv)", xa.maps.Affine(alpha="cv")),
        ("procrustes", xa.maps.Procrustes(scale=True)),
        ("lowrank(32)", xa.maps.LowRank(rank=32, alpha=1.0)),
    ):
        fitted[name] = m.fit(X, Y)
        s = m.score(Xh, Yh)
        maps.append({"map_kind": name, "source": src, "target": tgt, "score": s})
        log(f"{name:12s} {src} -> {tgt}: held-out R^2 {s['r2']:.3f}, cosine {s['cosine']:.3f}")
    shuffled = xa.maps.Affine(alpha="cv").fit(X, Y[torch.randperm(Y.shape[0], generator=g)]).score(Xh, Yh)
    log(f"{'control':12s} affine(cv) fit on shuffled pairs: held-out R^2 {shuffled['r2']:.3f}")
    maps.append({"map_kind": "affine(cv), shuffled pairs", "source": src, "target": tgt, "score": shuffled})
    run.results["maps"] = maps

    log("\n== patching: A's mapped activations written into B (held-out texts), vs mean-ablation")
    for name in ("affine(cv)", "procrustes"):
        fitted[name].bind(a=pair.a, b=pair.b, source=src, target=tgt)
    inj = (
        xa.maps.EmbeddingInjection(base_params={"alpha": "cv"})
        .fit(X, fit_rows.b["embed"])
        .bind(a=pair.a, b=pair.b, source=src, target="embed")
    )
    ab_texts = train[: max(4, len(train) // 4)]
    sets = {
        "affine(cv)": {(src, tgt): fitted["affine(cv)"]},
        "procrustes": {(src, tgt): fitted["procrustes"]},
        "embedding injection": {(src, "embed"): inj},
    }
    # one pass: B's clean run, A's source rows and each target's ablation are shared by the three
    grids = xa.effects.grids(
        pair, sets, held, ablation="mean", ablation_texts=ab_texts, batch_size=o.batch_size,
        drop_first=o.drop_first, progress=o.progress,
    )  # fmt: skip
    rows = []
    for name, g in grids.items():
        (e,) = g.effects.values()
        rows.append(effect_row(pair, e, label=name))
        log(
            f"{name:20s} {src} -> {e.target:14s} recovered {e.recovered:7.3f}  KL {e.kl:.3f}  "
            f"top-1 {e.top1_agreement:.3f}  (CE clean {e.ce_clean:.3f}, patched {e.ce_patched:.3f}, "
            f"ablated {e.ce_ablated:.3f}; {e.n_tokens} predictions)"
        )
        if e.note:
            log(f"{'':20s} note: {e.note}")
    run.results["effects"] = rows

    log("\n== text generated by B with the patch on the prompt")
    gen = xa.generate(
        pair,
        fitted["affine(cv)"],
        GEN_PROMPT,
        source=src,
        target=tgt,
        max_new_tokens=12,
        ablation_texts=ab_texts,
    )
    for k in ("clean", "patched", "ablated"):
        log(f"{k:8s}: {gen[k]!r}")
    run.results["generations"] = [generation_row(gen, "affine(cv)")]
    return run.finish()
