"""Aligned pairs per second of `collect` vs two plain forwards of the decoder stacks.

Same texts, same batches, same process; runs interleaved, median of the repeats.

  baseline : per batch and model: tokenize the batch (padded, no offsets) and run the HF decoder
             stack (`model.model`, a copy made before bridging: embedding + the blocks collect
             runs, i.e. through the deepest requested point, + the final norm; no unembedding)
             with output_hidden_states=True: what a hand-written loop computes before any alignment
  collect  : xa.collect(pair, texts, points_a, points_b): both tokenizations with character offsets,
             chunk alignment, two hooked forwards stopped after the deepest point (no unembedding;
             the final norm only for `final`), gather of the aligned rows, finiteness checks

So both sides run the same blocks of both models; the baseline runs the final norm besides (one
RMSNorm). The ratio collect/baseline is printed (target <= 1.10 on CPU), plus aligned pairs per
second. `--profile` prints where collect's time goes (cProfile, cumulative).

    python benchmarks/collect.py                       # tiny Llama vs tiny Mistral, pydoc texts
    python benchmarks/collect.py --points last --texts 64 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import xlens_align as xa


def breakdown(pair, refs, texts, pts_a, pts_b, batch: int, sync) -> dict[str, float]:
    """Seconds per stage of one pass: collect's (align, bridge forwards, gather and row checks)
    and the baseline's (tokenize, HF forwards), batch by batch in the same loop."""
    from xlens_align.activations import resolve_points, run_points
    from xlens_align.rows import RowFilter

    rows, out = (
        RowFilter(),
        dict.fromkeys(["align", "bridge forwards", "gather", "tokenize", "HF forwards"], 0.0),
    )
    pa, pb = resolve_points(pair.a, pts_a, "points_a"), resolve_points(pair.b, pts_b, "points_b")
    lim = (pair.a.n_ctx, pair.b.n_ctx)

    def lap(key: str, t: float) -> float:
        sync()
        now = time.perf_counter()
        out[key] += now - t
        return now

    with torch.no_grad():
        for s in range(0, len(texts), batch):
            chunk = texts[s : s + batch]
            t = time.perf_counter()
            ab = pair.align(chunk, max_length=lim)
            meta = ab.meta("last")
            t = lap("align", t)
            acts = run_points(pair.a, ab, "a", pa), run_points(pair.b, ab, "b", pb)
            t = lap("bridge forwards", t)
            for side, act, pts in (("a", acts[0], pa), ("b", acts[1], pb)):
                for p in pts:
                    rows.enter(ab.gather_side(act[p], side, "last"), p.name, side, meta)
            t = lap("gather", t)
            for m, ref in zip((pair.a, pair.b), refs, strict=True):
                ids, mask = m.to_tokens(chunk)
                t = lap("tokenize", t)
                ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                t = lap("HF forwards", t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--points", choices=["middle", "last", "all"], default="middle")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="also print collect's cProfile (cumulative)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time collect's stages against the baseline's, interleaved",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    kw = dict(n_layers=args.layers, d_model=args.d_model, n_heads=8, n_kv_heads=2, d_mlp=3 * args.d_model)
    hf_a, tok_a = xa.testing.tiny_hf("llama", seed=0, **kw)
    hf_b, tok_b = xa.testing.tiny_hf("mistral", seed=1, **kw)
    ref_a, ref_b = copy.deepcopy(hf_a.model).to(args.device), copy.deepcopy(hf_b.model).to(args.device)
    dev = args.device
    pair = xa.ModelPair(
        xa.load_model(hf_a, tokenizer=tok_a, device=dev), xa.load_model(hf_b, tokenizer=tok_b, device=dev)
    )
    texts = [t[:600] for t in xa.corpus.load("pydoc").train[: args.texts]]
    if args.points == "middle":
        pts_a, pts_b = [pair.a.point_at_depth(0.5)], [pair.b.point_at_depth(0.5)]
    elif args.points == "last":
        pts_a, pts_b = ["final"], ["final"]
    else:
        pts_a, pts_b = pair.a.points, pair.b.points
    for ref, m, pts in ((ref_a, pair.a, pts_a), (ref_b, pair.b, pts_b)):
        stop, _ = xa.points.forward_stop([m.point(p) for p in pts], m.n_layers)
        ref.layers = ref.layers[: stop or m.n_layers]  # the blocks collect runs

    def sync() -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def baseline() -> int:
        n = 0
        with torch.no_grad():
            for s in range(0, len(texts), args.batch):
                chunk = texts[s : s + args.batch]
                for m, ref in ((pair.a, ref_a), (pair.b, ref_b)):
                    ids, mask = m.to_tokens(chunk)
                    ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    n += int(mask.sum())
        sync()
        return n

    def ours() -> int:
        n = sum(pb.n for pb in xa.collect(pair, texts, pts_a, pts_b, batch_size=args.batch, progress=False))
        sync()
        return n

    baseline()
    n_pairs = ours()
    tb, to = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        baseline()
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours()
        to.append(time.perf_counter() - t)
    mb, mo = statistics.median(tb), statistics.median(to)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(texts)} texts, batch {args.batch}"
    )
    print(
        f"points A {pts_a[:3]}{'...' if len(pts_a) > 3 else ''}  points B {pts_b[:3]}{'...' if len(pts_b) > 3 else ''}"
    )
    blocks = f"{len(ref_a.layers)}/{pair.a.n_layers} and {len(ref_b.layers)}/{pair.b.n_layers} blocks"
    print(f"baseline (tokenize + two HF decoder stacks, {blocks}, hidden states): {mb:.3f} s")
    print(
        f"collect (offsets + align + two hooked forwards + gather)          : {mo:.3f} s   "
        f"{n_pairs} aligned pairs, {n_pairs / mo:.0f} pairs/s"
    )
    ratios = sorted(o / b for o, b in zip(to, tb, strict=True))
    print(
        f"ratio collect/baseline: {mo / mb:.3f} (medians; per repeat {', '.join(f'{r:.3f}' for r in ratios)})  "
        "(target <= 1.10)"
    )
    if args.breakdown:
        stages = breakdown(pair, (ref_a, ref_b), texts, pts_a, pts_b, args.batch, sync)
        print("per stage (s, one pass, summed over batches):")
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in stages.items()))
        fwd = stages["bridge forwards"] / stages["HF forwards"]
        print(f"  bridge forwards / HF decoder-stack forwards: {fwd:.3f}; align / tokenize: "
              f"{stages['align'] / stages['tokenize']:.3f}")  # fmt: skip
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(ours)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
