"""`xlens-align adapter` and `xlens-align generate`: maps trained through B, and text under a patch."""

from __future__ import annotations

import argparse
import time
from typing import Any

from xlens_align.report.results import generation_row

from .options import _at_least, comma_list, positive_number
from .results import effect_row
from .session import Run, log
from .stitch import fresh_maps, load_maps, map_files_arg

__all__ = ["ADAPTER", "GENERATE"]

OBJECTIVES = ("ce", "kl")


# -- adapter -----------------------------------------------------------------------------------
def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--objectives",
        type=comma_list("objectives", OBJECTIVES),
        default=["ce", "kl"],
        help="ce (B's next-token loss) and/or kl (to clean B); default ce,kl",
    )
    p.add_argument("--steps", type=_at_least(1), default=24, help="training steps (default 24)")
    p.add_argument("--lr", type=positive_number, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument(
        "--val-texts",
        type=_at_least(1),
        default=4,
        help="training passages after --texts for early stopping (default 4)",
    )
    p.add_argument(
        "--train-batch-size", type=_at_least(1), default=4, help="passages per training step (default 4)"
    )
    p.add_argument(
        "--ablation-texts",
        type=_at_least(1),
        default=8,
        help="passages after the validation ones whose mean is the ablation (default 8)",
    )


def adapter(run: Run) -> int:
    import xlens_align as xa

    o, own = run.opts, run.opts.own
    texts = run.texts(n_val=own["val_texts"], n_ablation=own["ablation_texts"])
    run.make_out()
    pair = run.load_pair()
    pts_a, pts_b = run.points(lambda m: [m.point_at_depth(0.4)])
    rows = []
    for src, tgt in run.pairs():
        fit = xa.activations.collect_all(
            pair, texts.fit, [src], [tgt], drop_first=o.drop_first, massive=o.massive, progress=False
        )
        X, Y = fit.a[src], fit.b[tgt]
        maps: dict[str, tuple[str, Any]] = {
            "affine(cv)": ("closed form", xa.maps.Affine(alpha="cv").fit(X, Y)),
            "procrustes": ("closed form", xa.maps.Procrustes(scale=True).fit(X, Y)),
        }
        history: dict[str, Any] = {}
        for objective in own["objectives"]:
            t1 = time.time()
            ad = xa.fitting.train_adapter(
                pair, source=src, target=tgt, texts=texts.fit, init="affine", objective=objective,
                steps=own["steps"], lr=own["lr"], batch_size=own["train_batch_size"], val_texts=texts.val,
                drop_first=o.drop_first, massive=o.massive, seed=o.seed, progress=o.progress,
            )  # fmt: skip
            name = f"adapter({objective}, from affine)"
            maps[name] = (objective, ad)
            history[name] = {"history": ad.history_, "train_s": time.time() - t1, "best_step": ad.best_step_}
            log(
                f"{name}: {len(ad.history_) - 1} validation checks, train loss {ad.init_train_loss_:.3f} -> "
                f"{ad.final_train_loss_:.3f}, val loss {ad.init_val_loss_:.3f} -> best {ad.best_val_loss_:.3f} "
                f"at step {ad.best_step_} (stopped early: {ad.stopped_early_}); {time.time() - t1:.0f} s"
            )
        for name, (objective, m) in maps.items():
            e = xa.effects.measure(
                pair, m, source=src, target=tgt, texts=texts.held, ablation="mean", ablation_texts=texts.ablation,
                batch_size=o.batch_size, drop_first=o.drop_first, massive=o.massive, progress=o.progress,
            )  # fmt: skip
            rows.append(effect_row(pair, e, objective=objective, label=name, **history.get(name, {})))
            log(
                f"{name:26s} recovered {e.recovered:6.3f}  KL {e.kl:.3f}  top-1 {e.top1_agreement:.3f}  "
                f"CE clean {e.ce_clean:.3f} patched {e.ce_patched:.3f} ablated {e.ce_ablated:.3f} "
                f"({e.n_tokens} predictions)"
            )
    run.results["adapter"] = rows
    return run.finish()


ADAPTER = {
    "help": "train adapters through B's loss and compare them with closed-form maps",
    "description": """\
For each point pair (default: relative depth 0.4 of each model, SmolLM2 resid_post.12 -> Gemma 3
resid_post.7) fits an affine map (ridge, alpha by validation) and a scaled Procrustes map on the
training passages, trains an adapter from the affine map through B with the patch in place for
each objective (ce: B's next-token loss; kl: KL to clean B), early-stopped on --val-texts
passages, and patches each into B over held-out passages against mean-ablation.

  xlens-align adapter --texts 32 --max-chars 200 --steps 24     # the README's table
  xlens-align adapter --tiny --texts 8 --eval-texts 4 --steps 4 --objectives kl
""",
    "defaults": {"texts": 32, "eval_texts": 16, "max_chars": 200},
    "args": _adapter_args,
    "run": adapter,
}


# -- generate ----------------------------------------------------------------------------------
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _generate_args(p: argparse.ArgumentParser) -> None:
    map_files_arg(p)
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt (default {PROMPT!r})")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=12, help="tokens to generate (default 12)")
    p.add_argument(
        "--ablation-texts",
        type=_at_least(1),
        default=8,
        help="training passages after --texts whose mean is the ablation (default 8)",
    )


def generate(run: Run) -> int:
    import xlens_align as xa

    o, own = run.opts, run.opts.own
    if not own["prompt"].strip():
        run.refuse("--prompt: give a non-empty prompt")
    texts = run.texts(n_ablation=own["ablation_texts"], eval_texts=False)
    run.make_out()
    pair = run.load_pair()
    if own["map_files"]:
        chosen = [(src, tgt, m, m.kind) for src, tgt, m in load_maps(run, own["map_files"])]
    else:
        pts_a, pts_b = run.points(lambda m: [m.point_at_depth(0.4)])
        pairs = run.pairs()
        chosen = []
        for kind in o.maps:
            maps = fresh_maps(run, texts.fit, pts_a, pts_b, kind, pairs=pairs)
            chosen += [(src, tgt, m, kind) for (src, tgt), m in maps.items()]
    gens = []
    for src, tgt, m, kind in chosen:
        g = xa.generate(
            pair, m, own["prompt"], source=src, target=tgt, max_new_tokens=own["max_new_tokens"],
            ablation_texts=texts.ablation, drop_first=o.drop_first, seed=o.seed,
        )  # fmt: skip
        gens.append(generation_row(g, kind))
        log(f"\n{kind} {src} -> {tgt}")
        for k in ("clean", "patched", "ablated"):
            log(f"{k:8s}: {g[k]!r}")
    run.results["generations"] = gens
    return run.finish()


GENERATE = {
    "help": "B's continuation of a prompt: clean, with A's mapped activations patched in, ablated",
    "description": """\
Fits each --maps kind for the point pairs (default: relative depth 0.4 of each model) on the
training passages, or loads --map-files, and lets B continue --prompt greedily three ways:
clean, with the mapped activations of A written at the prompt's aligned positions, and with
those positions mean-ablated.

  xlens-align generate --prompt "The capital of France is" --max-new-tokens 20
  xlens-align generate --tiny --texts 8 --map-files out/fit/maps/affine_resid_post.2_to_resid_post.2.safetensors
""",
    "defaults": {"texts": 32, "max_chars": 400, "maps": ["affine"]},
    "args": _generate_args,
    "run": generate,
}
