"""Aligned pairs per second of `collect` vs two plain HF forwards over the same texts.

Same texts, same batches, same process; runs interleaved, median of the repeats.

  baseline : tokenize the batch with each tokenizer (padded) and run each HF model (copies made
             before bridging) with output_hidden_states=True: what a hand-written loop does before
             any alignment
  collect  : xa.collect(pair, texts, points_a, points_b): both tokenizations, chunk alignment,
             two hooked forwards stopped after the deepest point, gather, finiteness checks

The ratio collect/baseline is printed (target <= 1.15 on CPU), plus aligned pairs per second.

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--points", choices=["middle", "last", "all"], default="middle")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    kw = dict(n_layers=args.layers, d_model=args.d_model, n_heads=8, n_kv_heads=2, d_mlp=3 * args.d_model)
    hf_a, tok_a = xa.testing.tiny_hf("llama", seed=0, **kw)
    hf_b, tok_b = xa.testing.tiny_hf("mistral", seed=1, **kw)
    ref_a, ref_b = copy.deepcopy(hf_a).to(args.device), copy.deepcopy(hf_b).to(args.device)
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
    print(f"baseline (two HF forwards, output_hidden_states): {mb:.3f} s")
    print(
        f"collect (align + two hooked forwards + gather)   : {mo:.3f} s   {n_pairs} aligned pairs, {n_pairs / mo:.0f} pairs/s"
    )
    print(f"ratio collect/baseline: {mo / mb:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
