"""How finely two real tokenizers line up on a corpus: Llama 3 (128k) vs Mistral v1 (32k) by default.

    python analyses/coverage.py                        # whole pydoc corpus
    python analyses/coverage.py --corpus notes.txt --json out/coverage.json

Aligned chunks tile every text (``char_coverage`` is 1.0 unless rows were truncated); the number
that says how fine the alignment is, is the share of characters in chunks that are exactly one
token on both sides (``one_to_one_char_coverage``), with tokens per chunk on each side.
Every chunk is checked to spell the same text on both sides (``tokens.verify`` on a sample).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import xlens_align as xa
from xlens_align.tokens import align, verify

TOKENIZERS = {"llama3": xa.tokenizers.llama3, "mistral_v1": xa.tokenizers.mistral_v1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="llama3", choices=sorted(TOKENIZERS))
    p.add_argument("--b", default="mistral_v1", choices=sorted(TOKENIZERS))
    p.add_argument("--corpus", default="pydoc", help="corpus spec for xlens_align.corpus.load")
    p.add_argument("--verify-every", type=int, default=10, help="verify every k-th row's chunk texts")
    p.add_argument("--json", default=None, help="also write the statistics here")
    args = p.parse_args()

    t0 = time.time()
    tok_a, tok_b = TOKENIZERS[args.a](), TOKENIZERS[args.b]()
    texts = xa.corpus.load(args.corpus, split="all")
    batch = align(tok_a, tok_b, texts)
    cov = batch.coverage()
    problems = verify(batch, tok_a, tok_b, rows=range(0, len(batch), args.verify_every))
    if problems:
        raise SystemExit(f"{len(problems)} chunks spell different texts, first: {problems[0]}")
    n_chars = sum(len(t) for t in texts)
    print(f"{args.a} vs {args.b} on {args.corpus!r}: {len(texts)} texts, {n_chars:,} characters")
    print(
        f"chunks {int(cov['chunks']):,} ({cov['chunks_per_text']:.1f} per text), "
        f"tokens {int(cov['tokens_a']):,} / {int(cov['tokens_b']):,} (A / B, BOS excluded)"
    )
    print(f"characters inside aligned chunks:         {cov['char_coverage']:.4f}")
    print(f"characters in 1:1-token chunks:           {cov['one_to_one_char_coverage']:.4f}")
    print(f"chunks that are one token on both sides:  {cov['one_to_one_chunk_share']:.4f}")
    print(
        f"tokens per chunk A / B:                   {cov['tokens_per_chunk_a']:.3f} / {cov['tokens_per_chunk_b']:.3f}"
    )
    print(
        f"share of A / B tokens that end a chunk:   {1 / cov['tokens_per_chunk_a']:.4f} / {1 / cov['tokens_per_chunk_b']:.4f}"
    )
    print(f"verified every {args.verify_every}th row: 0 mismatches; {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(cov, indent=1))


if __name__ == "__main__":
    main()
