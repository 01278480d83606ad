"""Every-layer similarity grid between two models on a corpus, saved as HTML heatmaps.

    python analyses/layer_grid.py                                   # SmolLM2-135M vs Gemma 3 270M, pydoc
    python analyses/layer_grid.py --measure svcca --texts 64
    python analyses/layer_grid.py --a path/to/llama --b path/to/mistral --device cuda

Writes ``<out>/<measure>_filtered.html`` and ``<out>/<measure>_unfiltered.html`` (with the
massive-activation row filter ``massive=--massive`` and without it, ``massive=None``) and ``<out>/<measure>.json``, and prints the
best-matching point of B for each point of A.
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
    p.add_argument("--corpus", default="pydoc")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--measure", default="cka")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--drop-first", type=int, default=1)
    p.add_argument("--massive", type=float, default=5.0, help="factor x the median row norm (filtered grid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/layer_grid")
    args = p.parse_args()

    t0 = time.time()
    pair = xa.ModelPair(xa.load_model(args.a, device=args.device), xa.load_model(args.b, device=args.device))
    corpus = xa.corpus.load(args.corpus)
    texts = [t[: args.max_chars] for t in corpus.train[: args.texts]]
    pts_a = ["embed", *(f"resid_post.{i}" for i in range(pair.a.n_layers)), "final"]
    pts_b = ["embed", *(f"resid_post.{i}" for i in range(pair.b.n_layers)), "final"]
    batches = list(
        xa.collect(
            pair, texts, pts_a, pts_b, batch_size=args.batch_size, drop_first=args.drop_first, progress=False
        )
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"run": xa.corpus.run_info(seed=0, corpus=corpus), "args": vars(args)}
    for label, massive in (("filtered", args.massive), ("unfiltered", None)):
        grid = xa.similarity.grid_from_batches(
            batches, args.measure, pts_a, pts_b, massive=massive, model_a=pair.a.name, model_b=pair.b.name
        )
        grid.save_html(out / f"{args.measure}_{label}.html")
        best = grid.best_match()
        summary[label] = {"n_tokens": grid.n_tokens, "best_match": best, "grid": json.loads(grid.to_json())}
        print(
            f"\n{args.measure} ({label}, {grid.n_tokens} rows, drop_first={args.drop_first}, massive={massive}, "
            f"dropped {grid.extra['filtered']}) -> "
            f"{out / f'{args.measure}_{label}.html'}"
        )
        for a, (b, v) in best.items():
            print(f"  {a:>14} -> {b:<14} {v:.3f}")
    with xa.files.atomic_path(out / f"{args.measure}.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(f"\n{len(texts)} texts, done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
