"""Scaling over processes: the same pipelines under torchrun on 1 and on N processes (GPUs).

The launcher runs this file under ``python -m torch.distributed.run --standalone
--nproc_per_node=W`` once for W = 1 and once for W = ``--nproc``; each run loads the pair on every
process (``cuda:LOCAL_RANK`` with ``--device cuda``, nccl; the CPU and gloo otherwise), warms up on
a few texts, then times, between barriers:

  cka      : similarity.layer_grid, streamed minibatch CKA of embed + every resid_post of A x B
  stats    : fitting.fit_grid, affine maps (fixed ridge) for 3 x 3 (source, target) pairs from
             one StatsGrid pass
  effects  : effects.measure of one of those maps at the middle points (the last --eval-texts
             passages), mean ablation over the first --eval-texts / 2

Each process reads its shard of the texts (`xlens_align.distributed`), the float64 sums are
all-reduced once per pipeline. Rank 0 writes the times and numbers; the launcher prints, per
pipeline, the time on 1 and W processes and the ratio (target >= 1.8 on 2 GPUs), the aligned
tokens, and how far the W-process numbers are from the 1-process ones (statistics and effects: to
float64 rounding; CKA: each process forms its own minibatches of ``--minibatch`` rows, so it
differs by minibatch noise, 0 with ``--minibatch 0``). Model loading is not timed.

    python benchmarks/distributed.py --device cuda --nproc 2              # embedded pair, >= 100k tokens
    python benchmarks/distributed.py --models tiny --texts 16 --nproc 2   # a quick CPU check (gloo)
    python benchmarks/distributed.py --models tiny --device cuda --backend gloo   # 2 processes, 1 GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import xlens_align as xa
from xlens_align import distributed

PIPELINES = ("cka", "stats", "effects")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="A,B (packaged names) or 'tiny'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument(
        "--texts", type=int, default=480, help="pydoc passages, cycled (480: ~117k aligned tokens)"
    )
    p.add_argument("--eval-texts", type=int, default=64, help="of them, for effects.measure")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=1024, help="CKA minibatch rows (0: each batch is one)")
    p.add_argument(
        "--backend", default=None, choices=["nccl", "gloo"], help="default: nccl on CUDA, else gloo"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (--device cpu)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the JSON file rank 0 writes
    return p.parse_args(argv)


def _pair(models: str, device: str) -> xa.ModelPair:
    if models == "tiny":
        kw = dict(n_layers=6, d_model=256, n_heads=8, n_kv_heads=2, d_mlp=768, device=device)
        return xa.ModelPair(xa.testing.tiny_llama(seed=0, **kw), xa.testing.tiny_mistral(seed=1, **kw))
    a, b = models.split(",")
    return xa.ModelPair(xa.load_model(a, device=device), xa.load_model(b, device=device))


def _texts(n: int) -> list[str]:
    base = xa.corpus.load("pydoc").texts
    return [base[i % len(base)] for i in range(n)]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if distributed.active():
        torch.distributed.barrier()


def worker(args: argparse.Namespace) -> None:
    dev = distributed.init_from_env(args.device, args.backend)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    pair = _pair(args.models, str(dev))
    texts = _texts(args.texts)
    held, evals = texts[: args.eval_texts // 2], texts[-args.eval_texts :]
    src = [pair.a.point_at_depth(f) for f in (0.25, 0.5, 0.75)]
    tgt = [pair.b.point_at_depth(f) for f in (0.25, 0.5, 0.75)]
    mb = args.minibatch or None
    kw = dict(batch_size=args.batch)

    def run(ts: list[str]) -> dict:
        out: dict = {}
        t = time.perf_counter()
        g = xa.similarity.layer_grid(pair, ts, minibatch_size=mb, progress=False, **kw)
        _sync()
        out["cka"], t = time.perf_counter() - t, time.perf_counter()
        maps = xa.fitting.fit_grid(pair, ts, src, tgt, "affine", alpha=1e-3, **kw)
        _sync()
        out["stats"], t = time.perf_counter() - t, time.perf_counter()
        m = maps[src[1], tgt[1]]
        e = xa.effects.measure(pair, m, source=src[1], target=tgt[1], texts=evals, ablation_texts=held, **kw)
        _sync()
        out["effects"] = time.perf_counter() - t
        out["numbers"] = {
            "cka": g.values.tolist(),
            "n_tokens": g.n_tokens,
            "weight": [mp.weight_.double().cpu().flatten()[:4096].tolist() for mp in maps.values()],
            "effect": [e.ce_clean, e.ce_patched, e.ce_ablated, e.recovered, e.kl, e.top1_agreement],
        }
        return out

    run(texts[: 2 * args.batch * distributed.world_size()])  # warm-up: kernels, caches, allocator
    _sync()
    result = run(texts)
    if distributed.is_main():
        gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        result |= {
            "world": distributed.world_size(),
            "device": gpu,
            "texts": len(texts),
            "torch": torch.__version__,
        }
        Path(args.worker).write_text(json.dumps(result))


def _launch(args: argparse.Namespace, world: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", str(out), "--models", args.models, "--device", args.device,
           "--texts", str(args.texts), "--eval-texts", str(args.eval_texts), "--batch", str(args.batch),
           "--minibatch", str(args.minibatch), "--threads", str(args.threads)]  # fmt: skip
    cmd += ["--backend", args.backend] if args.backend else []
    env = {**os.environ}
    if args.device == "cpu":  # the same threads per process whatever the number of processes
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _maxdiff(a, b) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((ta - tb).abs() / tb.abs().clamp(min=1.0)).max())


def main() -> None:
    args = _args()
    if args.worker:
        worker(args)
        return
    if args.models != "tiny":  # convert the packaged models once, before the processes load them
        for name in args.models.split(","):
            if name in xa.packaged.PACKAGED:
                xa.packaged.materialize(name)
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(args, 1, Path(tmp) / "one.json")
        many = _launch(args, args.nproc, Path(tmp) / "many.json")
    w = args.nproc
    n1, nw = one["numbers"], many["numbers"]
    print(f"{args.models} on {one['device']}, torch {one['torch']}, {one['texts']} texts, batch {args.batch}")
    print(f"aligned tokens: {n1['n_tokens']} (1 process), {nw['n_tokens']} ({w} processes)")
    print(f"{'pipeline':<10}{'1 process':>12}{f'{w} processes':>15}{'ratio':>8}")
    for k in (*PIPELINES, "total"):
        t1 = sum(one[p] for p in PIPELINES) if k == "total" else one[k]
        tw = sum(many[p] for p in PIPELINES) if k == "total" else many[k]
        print(f"{k:<10}{t1:>11.2f}s{tw:>14.2f}s{t1 / tw:>8.2f}")
    print(
        f"max relative difference {w} vs 1 process: maps {_maxdiff(nw['weight'], n1['weight']):.1e}, "
        f"effects {_maxdiff(nw['effect'], n1['effect']):.1e}, CKA {_maxdiff(nw['cka'], n1['cka']):.1e}"
        + (" (minibatches form per process)" if args.minibatch else "")
    )


if __name__ == "__main__":
    main()
