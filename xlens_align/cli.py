"""`xlens-align` command line.

xlens-align demo            # SmolLM2-135M (A) vs Gemma 3 270M (B) on CPython's pydoc text
xlens-align demo --tiny     # tiny random-init Llama vs Mistral, real vocabularies (fast)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


def _log(msg: str = "") -> None:
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


def _tiny_pair(args: argparse.Namespace):
    """The tiny random-init Llama (A) and Mistral (B) on --device in --dtype."""
    import torch

    import xlens_align as xa

    dtype = getattr(torch, args.dtype)
    a = xa.testing.tiny_llama(n_layers=4, seed=0, device=args.device, dtype=dtype)
    b = xa.testing.tiny_mistral(n_layers=4, seed=1, device=args.device, dtype=dtype)
    return xa.ModelPair(a, b)


def _at_least(lo: int) -> Any:
    """An argparse `type=`: an int >= `lo` (argparse then names the option and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"int >= {lo}"
    return parse


def _device(text: str) -> str:
    """An argparse `type=` for --device: a torch device that exists on this machine."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def _spaced(model: Any, k: int) -> list[str]:
    """k resid_post points evenly spaced over depth, plus 'embed'."""
    return ["embed", *model.spaced_points(k)]


def _forward_check(pair: Any) -> dict[str, Any]:
    import torch

    prompt = "The capital of France is"
    out = {}
    with torch.no_grad():
        for side, m in (("A", pair.a), ("B", pair.b)):
            ids, mask = m.to_tokens(prompt)
            logits, acts = m.run_with_points(ids, mask, ["final"], return_logits=True)
            hf = m.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            dl = (logits - hf.logits).abs().max().item()
            dh = (acts["final"] - hf.hidden_states[-1]).abs().max().item()
            nxt = m.tokenizer.decode(logits[0, -1].argmax())
            _log(
                f"{side}: forward check vs HF: max|logits diff| {dl:.1e}, max|final - hidden_states[-1]| {dh:.1e}"
            )
            _log(f"{side}: {prompt!r} -> {nxt!r}")
            out[side] = {"logits_diff": dl, "final_diff": dh, "next_token": nxt}
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import xlens_align as xa

    t0 = time.time()
    try:  # first: a missing or too-small corpus is refused before any work
        corpus = xa.corpus.load(args.corpus, seed=0)
    except (OSError, ValueError) as e:
        _refuse(f"--corpus {args.corpus!r}: {e}")
    for opt, have, want in (
        ("--n-train", corpus.train, args.n_train),
        ("--n-held", corpus.held_out, args.n_held),
    ):
        if len(have) < want:
            _refuse(f"{opt} {want}: corpus {args.corpus!r} has only {len(have)} such passages")
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _refuse(f"--out {args.out!r}: cannot make that folder ({e.strerror or e})")
    report: dict[str, Any] = {"run": xa.corpus.run_info(seed=0, corpus=corpus), "settings": vars(args).copy()}
    report["settings"].pop("func", None)
    models = (
        f"tiny random-init Llama + Mistral ({args.device}, {args.dtype})"
        if args.tiny
        else f"A={args.a}, B={args.b}"
    )
    _log(f"== models ({models})")
    pair = _tiny_pair(args) if args.tiny else _load_pair(args)
    for side, m in (("A", pair.a), ("B", pair.b)):
        _log(f"{side}: {m!r}")
        _log(
            f"   {len(m.points)} residual points: {', '.join(m.points[:4])}, ..., {', '.join(m.points[-2:])}"
        )
    report["forward_check"] = _forward_check(pair)

    _log("\n== text and alignment")
    train = [t[: args.max_chars] for t in corpus.train[: args.n_train]]
    held = [t[: args.max_chars] for t in corpus.held_out[: args.n_held]]
    cov = pair.align(train).coverage()
    _log(
        f"{len(train)} train / {len(held)} held-out passages of {args.corpus!r}; {int(cov['chunks'])} aligned chunks, "
        f"{cov['one_to_one_char_coverage']:.3f} of characters in 1:1-token chunks, "
        f"{cov['tokens_per_chunk_a']:.2f} / {cov['tokens_per_chunk_b']:.2f} tokens per chunk (A / B)"
    )
    report["coverage"] = cov

    _log(
        "\n== paired activations (one streamed pass per split; drop_first=1: the first text token, where massive activations sit, is left out)"
    )
    pts_a, pts_b = _spaced(pair.a, args.points), _spaced(pair.b, args.points)
    for side, m, pts in (("A", pair.a, pts_a), ("B", pair.b, pts_b)):
        if len(pts) < args.points + 1:
            _log(
                f"note: --points {args.points} > model {side}'s {m.n_layers} blocks: {len(pts) - 1} points used"
            )
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress, drop_first=1)
    tr = list(xa.collect(pair, train, pts_a, pts_b, **kw))
    ho = list(xa.collect(pair, held, pts_a, pts_b, **kw))
    n_tr, n_ho = sum(pb.n for pb in tr), sum(pb.n for pb in ho)
    _log(f"{n_tr} train rows, {n_ho} held-out rows at {len(pts_a)} x {len(pts_b)} points")
    for opt, n, need in (("--n-train", n_tr, 4), ("--n-held", n_ho, 2)):
        if n < need:
            _refuse(
                f"{opt} {getattr(args, opt[2:].replace('-', '_'))} with --max-chars {args.max_chars} leaves {n} "
                f"aligned rows after the first token of each text is dropped; the demo needs at least {need}: "
                "raise --max-chars or the number of passages"
            )

    _log(
        "\n== CKA between every layer pair (debiased minibatch CKA), with and without massive-activation filters"
    )
    grids = {}
    for label, massive in (("filtered", 5.0), ("unfiltered", None)):
        g = xa.similarity.grid_from_batches(
            tr, "cka", pts_a, pts_b, massive=massive, model_a=pair.a.name, model_b=pair.b.name
        )
        grids[label] = g
        path = out_dir / f"cka_{label}.html"
        g.save_html(path)
        _log(f"{label}: {g.n_tokens} rows -> {path}")
    best = grids["filtered"].best_match()
    _log(
        "best-matching point of B for each point of A (filtered): "
        + ", ".join(f"{a}->{b} ({v:.2f})" for a, (b, v) in best.items())
    )
    report["cka"] = {k: json.loads(g.to_json()) for k, g in grids.items()}

    _log("\n== alignment maps (fit on train, scored on held-out)")
    src, tgt = pts_a[len(pts_a) // 2], pts_b[len(pts_b) // 2]

    fit_rows, held_rows = xa.activations.concat(tr), xa.activations.concat(ho)
    X, Y = fit_rows.a[src], fit_rows.b[tgt]
    Xh, Yh = held_rows.a[src], held_rows.b[tgt]
    g = torch.Generator().manual_seed(0)
    maps_report = {}
    for name, m in (
        ("affine(cv)", xa.maps.Affine(alpha="cv")),
        ("procrustes", xa.maps.Procrustes(scale=True)),
        ("lowrank(32)", xa.maps.LowRank(rank=32, alpha=1.0)),
    ):
        m.fit(X, Y)
        s = m.score(Xh, Yh)
        maps_report[name] = s
        _log(f"{name:12s} {src} -> {tgt}: held-out R^2 {s['r2']:.3f}, cosine {s['cosine']:.3f}")
    shuffled = xa.maps.Affine(alpha="cv").fit(X, Y[torch.randperm(Y.shape[0], generator=g)]).score(Xh, Yh)
    _log(f"{'control':12s} affine(cv) fit on shuffled pairs: held-out R^2 {shuffled['r2']:.3f}")
    maps_report["shuffled_control"] = shuffled
    report["maps"] = {"source": src, "target": tgt, **maps_report}

    _log("\n== patching: A's mapped activations written into B (held-out texts), vs mean-ablation")
    fitted = {
        "affine(cv)": xa.maps.Affine(alpha="cv").fit(X, Y),
        "procrustes": xa.maps.Procrustes(scale=True).fit(X, Y),
    }
    for m in fitted.values():
        m.bind(a=pair.a, b=pair.b, source=src, target=tgt)
    inj = (
        xa.maps.EmbeddingInjection(base_params={"alpha": "cv"})
        .fit(X, fit_rows.b["embed"])
        .bind(a=pair.a, b=pair.b, source=src, target="embed")
    )
    ab_texts = train[: max(4, len(train) // 4)]
    effects = []
    for name, m, target in [*((n, m, tgt) for n, m in fitted.items()), ("embedding injection", inj, "embed")]:
        e = xa.effects.measure(
            pair,
            m,
            source=src,
            target=target,
            texts=held,
            ablation="mean",
            ablation_texts=ab_texts,
            batch_size=args.batch_size,
            drop_first=1,
        )
        effects.append(e)
        _log(
            f"{name:20s} {src} -> {target:14s} recovered {e.recovered:7.3f}  KL {e.kl:.3f}  "
            f"top-1 {e.top1_agreement:.3f}  (CE clean {e.ce_clean:.3f}, patched {e.ce_patched:.3f}, "
            f"ablated {e.ce_ablated:.3f}; {e.n_tokens} predictions)"
        )
        if e.note:
            _log(f"{'':20s} note: {e.note}")
    report["effects"] = [e.as_dict() for e in effects]

    _log("\n== text generated by B with the patch on the prompt")
    prompt = "The capital of France is Paris. The capital of Germany is"
    gen = xa.generate(
        pair, fitted["affine(cv)"], prompt, source=src, target=tgt, max_new_tokens=12, ablation_texts=ab_texts
    )
    for k in ("clean", "patched", "ablated"):
        _log(f"{k:8s}: {gen[k]!r}")
    report["generation"] = {k: gen[k] for k in ("prompt", "clean", "patched", "ablated")}

    with xa.files.atomic_path(out_dir / "report.json") as tmp:  # no half-written report on interruption
        tmp.write_text(json.dumps(report, indent=1, default=float))
    _log(f"\nreport: {out_dir / 'report.json'}; done in {time.time() - t0:.1f} s")
    return 0


def _refuse(msg: str) -> NoReturn:
    """Exit 2 with `msg`, the way argparse reports a bad option."""
    print(f"xlens-align demo: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(
        prog="xlens-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on the embedded default models and text")
    d.add_argument("--a", help="model A (packaged name, path or hub id; default smollm2-135m)")
    d.add_argument("--b", help="model B (packaged name, path or hub id; default gemma3-270m)")
    d.add_argument(
        "--tiny", action="store_true", help="use tiny random-init Llama/Mistral instead of --a/--b (fast)"
    )
    d.add_argument("--corpus", default="pydoc", help="corpus spec for xlens_align.corpus.load")
    d.add_argument("--n-train", type=_at_least(1), default=48, help="training passages (>= 1)")
    d.add_argument("--n-held", type=_at_least(1), default=16, help="held-out passages (>= 1)")
    d.add_argument(
        "--max-chars", type=_at_least(1), default=400, help="passages are cut to this many characters (>= 1)"
    )
    d.add_argument(
        "--points", type=_at_least(2), default=6, help="resid_post points per model in the grids (>= 2)"
    )
    d.add_argument("--batch-size", type=_at_least(1), default=8, help="texts per forward pass (>= 1)")
    d.add_argument(
        "--device", type=_device, default="cpu", help="torch device of both models (cpu, cuda, ...)"
    )
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--out", default="out/demo", help="folder for the report and heatmaps")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    args = p.parse_args(argv)
    if args.tiny and (args.a is not None or args.b is not None):
        d.error("--tiny runs the tiny random-init models: it cannot be combined with --a or --b")
    args.a = "smollm2-135m" if args.a is None else args.a
    args.b = "gemma3-270m" if args.b is None else args.b
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
