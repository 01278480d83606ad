"""Remote (NDIF on loopback) vs local: per-request overhead, and how many patched variants one
request carries.

Starts the project's local NDIF server (`xlens_align.remote.local.LocalServer`: the real `ndif`
package on 127.0.0.1, CPU) with one tiny random Llama, or uses a running server with ``--host``
and ``--model`` (a deployed checkpoint directory). The same checkpoint is loaded locally as a
`LensModel`; in the same process, alternating, best of ``--repeats``:

  read    : run_with_points(batch, every point)                 one request vs one hooked forward
  patch K : forward_patched on K replicates of the batch, each     one request carrying K variants
            with its own values written at every position of a     (what `effects.grid` sends)
            middle point (K = 1, 2, 4, ...)                        vs one local forward of K rows

Prints the times, the remote/local ratio, the per-request overhead (remote minus local) and the
time per variant as K grows, and checks that remote and local logits agree (<= 1e-5).

    python benchmarks/remote.py                     # starts and stops its own server (~40 s)
    python benchmarks/remote.py --variants 1 4 16 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import xlens_align as xa
from xlens_align.patching import forward_patched
from xlens_align.remote.local import LocalServer, tiny_checkpoint

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France, Berlin of Germany and Rome of Italy.",
    "Residual streams carry the model's state from one layer to the next.",
    "Tokenizers cut the same text differently: 12345 apples, 678 pears!",
]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def spec_for(model, ids: torch.Tensor, k: int, point: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """K replicates of the batch, replicate j written with its own random values everywhere."""
    B, T = ids.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(B * k).repeat_interleave(T)
    pos = torch.arange(T).repeat(B * k)
    values = torch.randn(B * k * T, model.d_model, generator=g) * 0.1
    return ids.repeat(k, 1), {point: (values, (rows, pos))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="a running NDIF server (default: start a local one)")
    p.add_argument("--model", help="with --host: a deployed checkpoint directory")
    p.add_argument("--variants", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)

    server = None
    if args.host:
        if not args.model:
            p.error("--host needs --model (a checkpoint directory deployed there)")
        host, path = args.host, Path(args.model)
    else:
        path = tiny_checkpoint(
            Path(tempfile.mkdtemp()) / "bench-llama", "llama", vocab_size=512, n_layers=args.layers,
            d_model=args.d_model,
        )  # fmt: skip
        t = time.perf_counter()
        server = LocalServer([path]).start()
        host = server.host
        print(f"local NDIF server up in {time.perf_counter() - t:.1f} s at {host}")
        print("".join(f"  {line}\n" for line in (server.run_dir / "up.log").read_text().splitlines()))
    try:
        run(host, path, args)
    finally:
        if server is not None:
            server.stop()


def run(host: str, path: Path, args: argparse.Namespace) -> None:
    local = xa.load_model(path)
    remote = xa.load_model(f"remote:{path}", host=host, timeout=300)
    ids, mask = local.to_tokens(SENTENCES)
    B, T = ids.shape
    print(f"model {local.name}: {local.n_layers} layers, d_model {local.d_model}, vocab {local.vocab_size}; "
          f"batch {B} x {T} tokens; best of {args.repeats}")  # fmt: skip
    remote.run_with_points(ids, mask, ["final"])  # warm: the first request of a session is slower

    with torch.no_grad():
        t_local = best(lambda: local.run_with_points(ids, mask, local.points), args.repeats)
        t_remote = best(lambda: remote.run_with_points(ids, mask, remote.points), args.repeats)
    print(f"\nread every point ({len(local.points)}) of one batch")
    print(f"  local {t_local * 1e3:8.1f} ms   remote {t_remote * 1e3:8.1f} ms   ratio {t_remote / t_local:6.1f}x   "
          f"overhead per request {(t_remote - t_local) * 1e3:.1f} ms")  # fmt: skip

    point = local.point_at_depth(0.5)
    print(f"\npatched variants per request (every position of {point} written; logits returned)")
    print(
        f"  {'K':>4} {'local ms':>10} {'remote ms':>10} {'ratio':>7} {'remote ms/variant':>18} {'max |diff|':>11}"
    )
    first = None
    for k in args.variants:
        ids_k, spec = spec_for(local, ids, k, point)
        mask_k = mask.repeat(k, 1)
        with torch.no_grad():
            out_l = forward_patched(local, ids_k, mask_k, spec)
            out_r = forward_patched(remote, ids_k, mask_k, spec)
            real = mask_k.bool()
            diff = (out_l - out_r)[real].abs().max().item()
            tl = best(
                lambda ids_k=ids_k, mask_k=mask_k, spec=spec: forward_patched(local, ids_k, mask_k, spec),
                args.repeats,
            )
            tr = best(
                lambda ids_k=ids_k, mask_k=mask_k, spec=spec: forward_patched(remote, ids_k, mask_k, spec),
                args.repeats,
            )
        first = first or tr
        print(f"  {k:>4} {tl * 1e3:10.1f} {tr * 1e3:10.1f} {tr / tl:6.1f}x {tr / k * 1e3:18.1f} {diff:11.1e}")
        assert diff <= 1e-5, f"remote and local logits differ by {diff:.2e} at K={k}"
    k_max = args.variants[-1]
    print(f"\none request with {k_max} variants takes {tr / first:.1f}x the time of one with {args.variants[0]}: "
          f"{first / tr * k_max / args.variants[0]:.1f}x the variants per second")  # fmt: skip


if __name__ == "__main__":
    main()
