"""`xlens-align` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _load_pair(args: argparse.Namespace):
    import torch

    import xlens_align as xa

    if args.tiny:
        a = xa.testing.tiny_llama(n_layers=4, seed=0)
        b = xa.testing.tiny_mistral(n_layers=4, seed=1)
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        a = xa.load_model(args.a, device=args.device, dtype=dtype)
        b = xa.load_model(args.b, device=args.device, dtype=dtype)
    return xa.ModelPair(a, b)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    t0 = time.time()
    _log(
        f"loading models ({'tiny random-init Llama + Mistral' if args.tiny else f'{args.a} vs {args.b}'}) ..."
    )
    pair = _load_pair(args)
    for side, m in (("A", pair.a), ("B", pair.b)):
        _log(f"{side}: {m!r}")
        _log(
            f"   {len(m.points)} residual points: {', '.join(m.points[:4])}, ..., {', '.join(m.points[-2:])}"
        )
        _log(f"   e.g. {m.points[-2]} -> hook {m.hook_name(m.points[-2])}")
    prompt = "The capital of France is"
    with torch.no_grad():
        for side, m in (("A", pair.a), ("B", pair.b)):
            ids, mask = m.to_tokens(prompt)
            logits, acts = m.run_with_points(ids, mask, ["resid_pre.0", "final"], return_logits=True)
            hf = m.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            dl = (logits - hf.logits).abs().max().item()
            dh = (acts["final"] - hf.hidden_states[-1]).abs().max().item()
            nxt = m.tokenizer.decode(logits[0, -1].argmax())
            _log(
                f"{side}: forward check vs HF: max|logits diff| {dl:.2e}, max|final - hidden_states[-1]| {dh:.2e}"
            )
            _log(f"{side}: {prompt!r} -> {nxt!r}")
    _log(f"done in {time.time() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="xlens-align", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on the embedded default models and text")
    d.add_argument("--a", default="smollm2-135m", help="model A (packaged name, path or hub id)")
    d.add_argument("--b", default="gemma3-270m", help="model B (packaged name, path or hub id)")
    d.add_argument("--tiny", action="store_true", help="use tiny random-init Llama/Mistral instead (fast)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--out", default="out/demo", help="folder for the report")
    d.set_defaults(func=cmd_demo)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
