"""Closed-form maps against an adapter trained through B's next-token loss, on real models.

    python analyses/adapter.py                       # SmolLM2-135M -> Gemma 3 270M, ~10 min on 2 CPU cores
    python analyses/adapter.py --steps 200 --fit-texts 64 --max-chars 400 --device cuda

An affine map (ridge, alpha by validation) and a scaled Procrustes map are fitted on the paired
activations of the fit texts; an adapter starts from the same affine map (``init="affine"``)
and is trained through B with the patch in place, once with B's next-token cross-entropy
(``objective="ce"``) and once with KL to clean B (``"kl"``), early-stopped on validation texts.
Each is then patched into B over held-out texts (`effects.measure`, mean-ablation from other
texts) and the table printed; ``<out>/adapter.json`` keeps every number and the training history.
The adapter's training and validation losses are scored by the same plan and scorer as
`effects.measure` (predictions from the first patched position on), so its validation CE is the
``ce_patched`` that `effects.measure` reports on the validation texts.
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
    p.add_argument("--source", default="resid_post.12")
    p.add_argument("--target", default="resid_post.7")
    p.add_argument("--fit-texts", type=int, default=32)
    p.add_argument("--val-texts", type=int, default=4)
    p.add_argument("--eval-texts", type=int, default=16)
    p.add_argument("--max-chars", type=int, default=200)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--objectives", default="ce,kl", help="comma-separated: ce (B's next-token loss), kl (to clean B)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/adapter")
    args = p.parse_args()

    t0 = time.time()
    pair = xa.ModelPair(xa.load_model(args.a, device=args.device), xa.load_model(args.b, device=args.device))
    corpus = xa.corpus.load("pydoc")

    def cut(texts):
        return [t[: args.max_chars] for t in texts]

    n_fit, n_val = args.fit_texts, args.val_texts
    fit = cut(corpus.train[:n_fit])
    val = cut(corpus.train[n_fit : n_fit + n_val])
    ablation = cut(corpus.train[n_fit + n_val : n_fit + n_val + 8])
    held = cut(corpus.held_out[: args.eval_texts])
    src, tgt = args.source, args.target

    rows = xa.activations.collect_all(pair, fit, [src], [tgt], drop_first=1, progress=False)
    X, Y = rows.a[src], rows.b[tgt]
    maps = {
        "affine(cv)": xa.maps.Affine(alpha="cv").fit(X, Y),
        "procrustes": xa.maps.Procrustes(scale=True).fit(X, Y),
    }
    for m in maps.values():
        m.bind(a=pair.a, b=pair.b, source=src, target=tgt)
    history, train_s = {}, {}
    for objective in args.objectives.split(","):
        t1 = time.time()
        ad = xa.fitting.train_adapter(
            pair,
            source=src,
            target=tgt,
            texts=fit,
            init="affine",
            objective=objective,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            val_texts=val,
            drop_first=1,
        )
        name = f"adapter({objective}, from affine)"
        train_s[name], history[name] = time.time() - t1, ad.history_
        maps[name] = ad
        print(
            f"{name}: {len(ad.history_) - 1} validation checks, train loss {ad.init_train_loss_:.3f} -> "
            f"{ad.final_train_loss_:.3f}, val loss {ad.init_val_loss_:.3f} -> best {ad.best_val_loss_:.3f} "
            f"at step {ad.best_step_} (stopped early: {ad.stopped_early_}); {train_s[name]:.0f} s"
        )

    effects = []
    for name, m in maps.items():
        e = xa.effects.measure(
            pair,
            m,
            source=src,
            target=tgt,
            texts=held,
            ablation="mean",
            ablation_texts=ablation,
            drop_first=1,
        )
        effects.append(e)
        print(
            f"{name:26s} recovered {e.recovered:6.3f}  KL {e.kl:.3f}  top-1 {e.top1_agreement:.3f}  "
            f"CE clean {e.ce_clean:.3f} patched {e.ce_patched:.3f} ablated {e.ce_ablated:.3f} "
            f"({e.n_tokens} predictions)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "run": xa.corpus.run_info(seed=0, corpus=corpus),
        "args": vars(args),
        "effects": {name: e.as_dict() for name, e in zip(maps, effects, strict=True)},
        "adapter_history": history,
        "train_seconds": train_s,
    }
    with xa.files.atomic_path(out / "adapter.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    print(f"-> {out / 'adapter.json'}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
