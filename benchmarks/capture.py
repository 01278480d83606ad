"""Capturing every residual point through LensModel vs one HF forward with output_hidden_states.

Same batch, same process, runs interleaved (A B A B ...), median of the repeats. Prints, per
model, the time of

  hf        : HF model (a copy made before bridging), output_hidden_states=True, logits computed
  lens+logits: LensModel.run_with_points(all points, return_logits=True)  (same work as hf)
  lens      : LensModel.run_with_points(all points)  (stops after the final norm: no unembedding)

and the ratios lens+logits/hf and lens/hf. Target: lens+logits/hf <= 1.10 on CPU.

    python benchmarks/capture.py                      # tiny-llama and smollm2, batch 4 x 128 tokens
    python benchmarks/capture.py --models tiny-llama --batch 8 --seq 256 --repeats 7
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


def build(name: str, device: str):
    if name == "tiny-llama":
        hf, tok = xa.testing.tiny_hf("llama", n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, d_mlp=768)
    elif name == "tiny-mistral":
        hf, tok = xa.testing.tiny_hf("mistral", n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, d_mlp=768)
    else:
        from transformers import AutoModelForCausalLM

        path = xa.packaged.materialize(name)
        hf, tok = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32), path
    ref = copy.deepcopy(hf).to(device).eval()
    lens = xa.load_model(hf, tokenizer=tok, device=device, name=name)
    return lens, ref


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(name: str, batch: int, seq: int, repeats: int, device: str) -> dict[str, float]:
    lens, ref = build(name, device)
    g = torch.Generator().manual_seed(0)
    vocab = min(lens.tokenizer.vocab_size, ref.config.vocab_size)
    ids = torch.randint(100, vocab - 1, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    runs = {
        "hf": lambda: ref(input_ids=ids, attention_mask=mask, output_hidden_states=True),
        "lens+logits": lambda: lens.run_with_points(ids, mask, lens.points, return_logits=True),
        "lens": lambda: lens.run_with_points(ids, mask, lens.points),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{name:12s} batch {batch}x{seq}  hf {med['hf'] * 1e3:8.1f} ms   lens+logits {med['lens+logits'] * 1e3:8.1f} ms"
        f"   lens {med['lens'] * 1e3:8.1f} ms   ratio lens+logits/hf {med['lens+logits'] / med['hf']:.3f}"
        f"   lens/hf {med['lens'] / med['hf']:.3f}",
        flush=True,
    )
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-llama,smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models.split(","):
        bench(name.strip(), args.batch, args.seq, args.repeats, args.device)


if __name__ == "__main__":
    main()
