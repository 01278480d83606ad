"""The parity matrix of the README: each supported family's points against Hugging Face's numbers.

    python analyses/parity.py            # tiny random-init Llama, Mistral, Qwen2, Gemma 3
    python analyses/parity.py --real     # also the packaged SmolLM2-135M and Gemma 3 270M (slow)

Prints a Markdown table of the max abs difference between the bridge's value
(`LensModel.run_with_points`) and HF's (``hidden_states``, hooks on the HF modules, logits) for
every point kind, with the transformers and TransformerLens versions it was checked on. The
computation is the one of ``tests/test_parity.py`` (see its docstring for each reference).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_parity import ATOL, FAMILIES, KINDS, TEXTS, family_model, parity_row  # noqa: E402

import xlens_align as xa  # noqa: E402


def _rows(real: bool) -> list[tuple[str, str, dict[str, float]]]:
    out = []
    for family in FAMILIES:
        lens, ref = family_model(family)
        out.append((family, "tiny random-init, 3 layers", parity_row(lens, ref)))
    if real:
        from transformers import AutoModelForCausalLM

        for name in ("smollm2-135m", "gemma3-270m"):
            lens = xa.load_model(name)
            path = str(xa.packaged.materialize(name))
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
            out.append((lens.family, f"{name} (packaged)", parity_row(lens, ref.eval(), TEXTS[:1])))
    return out


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    head = ["family", "model", *KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, what, row in rows:
        lines.append("| " + " | ".join([family, what, *(f"{row[k]:.1e}" for k in KINDS)]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="also the packaged real models (slow)")
    args = p.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    rows = _rows(args.real)
    versions = ", ".join(
        f"{pkg} {metadata.version(pkg)}" for pkg in ("transformers", "transformer-lens", "torch")
    )
    print(f"Max abs difference, bridge vs Hugging Face (float32, CPU; {versions}):\n")
    print(table(rows))
    tol = ", ".join(f"{k} {ATOL.get(k, 1e-6):.0e}" for k in KINDS)
    print(f"\nTolerances of tests/test_parity.py (tiny models): {tol}.")


if __name__ == "__main__":
    main()
