"""Carry a sentiment steering vector and probes from SmolLM2-135M (A) to Gemma 3 270M (B) through an
affine map, and read A's state through B's unembedding (a logit lens across tokenizers).

    python analyses/transfer.py                    # A resid_post.19 -> B resid_post.6, CPU
    python analyses/transfer.py --source resid_post.10 --target resid_post.6 --alpha 8

The default pair of points is the best `resid_post` cell of the README's functional grid away from
the embeddings (A 19 -> B 6, 0.944 recovered). Steps:

1. an affine map (ridge, alpha by validation) fit on paired token rows of the shipped pydoc text
   (`--fit-texts` training passages cut to `--max-chars`; first token dropped), scored on held-out
   passages; a second map from the same A point into B's ``final`` for the lens;
2. steering: A's sentiment vector (difference of means over the template sentences' training
   half) carried into B (`transfer_direction`, exact for the affine map, rescaled to B's median
   token norm at the target relative to A's), against B's own vector found the same way and
   random vectors of the transferred vector's norm: change of B's log-odds " good" vs " bad"
   after the steering prompts, change of CE on neutral sentences, 95% bootstrap intervals over
   prompts / texts, and the fraction of B's own vector's effect (paired bootstrap);
3. probes (sentiment, topic, language): A's probe carried to B's rows by the map's
   pseudo-inverse and by refitting on mapped rows, against B's own probe and chance, on held-out
   rows;
4. the cross-model lens on one prompt, beside A's own logit lens.

Writes ``<out>/transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import xlens_align as xa
from xlens_align.transfer import templates


def fit_maps(pair, args, corpus):
    fit = [t[: args.max_chars] for t in corpus.train[: args.fit_texts]]
    held = [t[: args.max_chars] for t in corpus.held_out[: args.held_texts]]
    kw = dict(drop_first=1, batch_size=8, progress=False)
    tr = xa.activations.collect_all(pair, fit, [args.source], [args.target, "final"], **kw)
    te = xa.activations.collect_all(pair, held, [args.source], [args.target, "final"], **kw)
    maps, scores = {}, {}
    for tgt in (args.target, "final"):
        m = xa.maps.Affine(alpha="cv").fit(tr.a[args.source], tr.b[tgt])
        maps[tgt] = m.bind(a=pair.a, b=pair.b, source=args.source, target=tgt)
        scores[tgt] = m.score(te.a[args.source], te.b[tgt])
        print(
            f"affine {args.source} -> {tgt}: {tr.n} fit rows, held-out R^2 {scores[tgt]['r2']:.3f} ({te.n} rows)"
        )
    return maps, scores


def steering(pair, m, args, neutral):
    a, b = pair.a, pair.b
    pos, neg = templates.sentiment()
    train, _ = xa.files.split_indices(len(pos), 0.5, args.seed)
    pos, neg = [pos[i] for i in train], [neg[i] for i in train]
    kw = dict(progress=False)
    v_a = xa.transfer.steering_vector(a, pos, neg, args.source, **kw)
    v_b = xa.transfer.steering_vector(b, pos, neg, args.target, **kw)
    s_a = xa.transfer.activation_norm(a, neutral, args.source, **kw)
    s_b = xa.transfer.activation_norm(b, neutral, args.target, **kw)
    w = xa.transfer.transfer_direction(m, v_a, norms=(s_a, s_b))
    w_map = xa.transfer.transfer_direction(m, v_a)
    cos = float(torch.nn.functional.cosine_similarity(w, v_b, dim=0))
    print(
        f"|v_A| {v_a.norm():.3f} (median token norm {s_a:.2f}), |v_B| {v_b.norm():.3f} (median {s_b:.2f}), "
        f"|v_A W| {w_map.norm():.3f} -> rescaled {w.norm():.3f}; cos(transferred, own) {cos:.3f}"
    )
    gen = torch.Generator().manual_seed(args.seed)
    vectors = {"own (B)": v_b, "transferred": w, "transf. @|own|": w * (v_b.norm() / w.norm())}
    for i in range(args.n_random):  # random controls at B's own norm, and one at the transferred norm
        r = torch.randn(b.d_model, generator=gen, dtype=torch.float64)
        vectors[f"random {i} @|own|"] = r * (v_b.norm() / r.norm())
    r = torch.randn(b.d_model, generator=gen, dtype=torch.float64)
    vectors["random @|transf.|"] = r * (w.norm() / r.norm())
    table = xa.transfer.steering_effects(
        b,
        args.target,
        vectors,
        prompts=list(templates.STEER_PROMPTS),
        targets=templates.STEER_TARGETS,
        neutral=neutral,
        alpha=args.alpha,
        reference="own (B)",
        n_boot=args.n_boot,
        seed=args.seed,
        progress=False,
    )
    table.extra.update(
        norm_a=s_a, norm_b=s_b, cos_transferred_own=cos, map_norm=float(w_map.norm()), n_vector_pairs=len(pos)
    )
    print(table.text)
    return table


def probes(pair, m, args):
    out = {}
    for name in args.probe_sets.split(","):
        texts, y = templates.labelled(name)
        y = torch.tensor(y)
        tr, te = xa.files.split_indices(len(texts), 0.3, args.seed)
        Xa = xa.transfer.pooled(pair.a, texts, args.source, progress=False)
        Xb = xa.transfer.pooled(pair.b, texts, args.target, progress=False)
        p_a = xa.transfer.fit_probe(Xa[tr], y[tr])
        found = {
            "own (B)": xa.transfer.fit_probe(Xb[tr], y[tr]),
            "transferred (pinv)": xa.transfer.transfer_probe(m, p_a, method="pinv"),
            "transferred (refit)": xa.transfer.transfer_probe(
                m, p_a, method="refit", rows=Xa[tr], labels=y[tr]
            ),
        }
        t = xa.transfer.probe_accuracy(found, Xb[te], y[te], n_boot=args.n_boot, seed=args.seed)
        a_own = float(p_a.correct(Xa[te], y[te]).mean())
        print(f"[{name}] A's own probe on A's held-out rows: {a_own:.3f}\n{t.text}")
        out[name] = {**t.as_dict(), "a_own_on_a": a_own}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="smollm2-135m")
    p.add_argument("--b", default="gemma3-270m")
    p.add_argument("--source", default="resid_post.19")
    p.add_argument("--target", default="resid_post.6")
    p.add_argument("--fit-texts", type=int, default=32)
    p.add_argument("--held-texts", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--alpha", type=float, default=4.0, help="steering strength (x vector)")
    p.add_argument("--n-random", type=int, default=3)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--probe-sets", default="sentiment,topic,language")
    p.add_argument("--lens-prompt", default="The capital of France is Paris. The capital of Germany is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/transfer")
    args = p.parse_args()

    t0 = time.time()
    pair = xa.ModelPair(xa.load_model(args.a, device=args.device), xa.load_model(args.b, device=args.device))
    corpus = xa.corpus.load("pydoc")
    print(f"[{time.time() - t0:.0f} s] models loaded")
    maps, scores = fit_maps(pair, args, corpus)
    print(f"[{time.time() - t0:.0f} s] maps fit")
    neutral = list(templates.NEUTRAL)
    table = steering(pair, maps[args.target], args, neutral)
    print(f"[{time.time() - t0:.0f} s] steering measured")
    probe_tables = probes(pair, maps[args.target], args)
    print(f"[{time.time() - t0:.0f} s] probes measured")
    view = xa.transfer.cross_lens(pair.a, pair.b, maps["final"], [args.lens_prompt], args.source, k=3)
    print(view.text(width=44))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "run": xa.corpus.run_info(seed=args.seed, corpus=corpus),
        "args": vars(args),
        "map_scores": scores,
        "steering": table.as_dict(),
        "probes": probe_tables,
        "lens": {"tokens": view.tokens[0], "own": view.own[0], "cross": view.cross[0]},
    }
    with xa.files.atomic_path(out / "transfer.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    print(f"-> {out / 'transfer.json'}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
