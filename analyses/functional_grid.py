"""Functional heatmap: how much of B's next-token loss a map from each layer of A recovers at each layer of B.

    python analyses/functional_grid.py                         # SmolLM2-135M -> Gemma 3 270M, 4 x 4 layers
    python analyses/functional_grid.py --layers 6 --kind procrustes --device cuda

Affine maps (ridge, alpha by validation) are fitted for every (source, target) pair from one
streamed pass over the fit texts (`fitting.fit_grid`), then every cell is patched into B over
held-out texts in batched forwards (`effects.grid`), against mean-ablation at the same point.
Writes ``<out>/functional_<kind>.html`` (recovered) and ``.json`` (all metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import xlens_align as xa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="smollm2-135m")
    p.add_argument("--b", default="gemma3-270m")
    p.add_argument("--layers", type=int, default=4, help="resid_post points per model, evenly spaced")
    p.add_argument("--kind", default="affine", choices=["affine", "procrustes", "lowrank", "cca"])
    p.add_argument("--fit-texts", type=int, default=32)
    p.add_argument("--eval-texts", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/functional_grid")
    args = p.parse_args()

    t0 = time.time()
    pair = xa.ModelPair(xa.load_model(args.a, device=args.device), xa.load_model(args.b, device=args.device))
    corpus = xa.corpus.load("pydoc")
    fit = [t[: args.max_chars] for t in corpus.train[: args.fit_texts]]
    ablation = [t[: args.max_chars] for t in corpus.train[args.fit_texts : args.fit_texts + 8]]
    held = [t[: args.max_chars] for t in corpus.held_out[: args.eval_texts]]

    sources, targets = pair.a.spaced_points(args.layers), pair.b.spaced_points(args.layers)
    kind_kw = {"alpha": "cv"} if args.kind == "affine" else {"rank": 64} if args.kind == "lowrank" else {}
    if args.kind == "cca":
        kind_kw = {"k": 64}
    maps = xa.fitting.fit_grid(
        pair, fit, sources, targets, kind=args.kind, drop_first=1, progress=False, **kind_kw
    )
    g = xa.effects.grid(pair, maps, held, ablation="mean", ablation_texts=ablation, drop_first=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = xa.similarity.Grid(
        g.recovered,
        sources,
        targets,
        f"recovered ({args.kind})",
        g.n_tokens,
        model_a=pair.a.name,
        model_b=pair.b.name,
    )
    grid.save_html(out / f"functional_{args.kind}.html")
    rows = [e.as_dict() for e in g.effects.values()]
    report = {"run": xa.corpus.run_info(seed=0, corpus=corpus), "args": vars(args), "effects": rows}
    with xa.files.atomic_path(out / f"functional_{args.kind}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    print(
        f"{args.kind} maps, {len(fit)} fit texts, {len(held)} held-out texts, {g.n_tokens} scored predictions"
    )
    print(f"B clean CE {g.ce_clean:.3f}")
    print(xa.effects.table(list(g.effects.values())).text)
    print(f"-> {out / f'functional_{args.kind}.html'}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
