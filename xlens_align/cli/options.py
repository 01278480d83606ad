"""The one option set every `xlens-align` subcommand shares, parsed into `Options`.

Each option is checked once, by its argparse ``type=``, so a bad value exits 2 with a message
that names the option (``argument --batch-size: expected an integer >= 1, got 0``). Checks that
need the models (point names) or the corpus (passage counts) go through `refuse`, which exits
the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_A",
    "DEFAULT_B",
    "KIND_PARAMS",
    "Options",
    "add_shared",
    "comma_list",
    "options_from",
    "refuse",
]

DEFAULT_A, DEFAULT_B = "smollm2-135m", "gemma3-270m"
DTYPES = ("float32", "bfloat16", "float16")

#: the map kinds `--maps` takes and the hyper-parameters each is fitted with
KIND_PARAMS: dict[str, dict[str, Any]] = {
    "affine": {"alpha": "cv"},
    "procrustes": {"scale": True},
    "lowrank": {"rank": 64},
    "cca": {"k": 64},
}


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


def positive_number(text: str) -> float:
    """An argparse `type=`: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


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


def comma_list(what: str, choices: tuple[str, ...] | None = None) -> Any:
    """An argparse `type=`: a non-empty comma-separated list (of `choices` when given)."""

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",")]
        if not text.strip() or any(not s for s in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        bad = [s for s in items if choices is not None and s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}: choose from {', '.join(choices or ())}")
        return list(dict.fromkeys(items))

    parse.__name__ = f"list of {what}"
    return parse


def _depths(text: str) -> list[float]:
    """An argparse `type=` for --depths: comma-separated fractions in [0, 1]."""
    out = []
    for item in comma_list("relative depths")(text):
        try:
            f = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {item!r}") from None
        if not 0.0 <= f <= 1.0:
            raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {item!r}")
        out.append(f)
    return out


@dataclass
class Options:
    """Every shared option, checked; `own` holds the subcommand's own options by name."""

    command: str
    a: str
    b: str
    tiny: bool
    corpus: str
    texts: int
    eval_texts: int
    max_chars: int
    points: int | None
    points_a: list[str] | None
    points_b: list[str] | None
    depths: list[float] | None
    maps: list[str]
    device: str
    dtype: str
    batch_size: int
    out: str
    seed: int
    progress: bool
    drop_first: int
    massive: float | None
    own: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The options as JSON values (the subcommand's own ones included)."""
        d = {k: v for k, v in vars(self).items() if k != "own"}
        return {**d, **self.own}


def add_shared(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add the shared options to subcommand parser `p`; `defaults` override the usual ones."""
    g = p.add_argument_group("models")
    g.add_argument(
        "--a",
        help=f"model A: any load_model source (packaged name, path, hub id, remote:<id>; default {DEFAULT_A})",
    )
    g.add_argument("--b", help=f"model B: as --a (default {DEFAULT_B})")
    g.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random-init Llama (A) / Mistral (B) with real vocabularies (fast)",
    )
    g.add_argument(
        "--device", type=_device, default="cpu", help="torch device of both models (cpu, cuda, cuda:1, ...)"
    )
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    g = p.add_argument_group("text")
    g.add_argument(
        "--corpus",
        default="pydoc",
        help="corpus spec for xlens_align.corpus.load (default: the shipped pydoc text)",
    )
    g.add_argument(
        "--texts",
        "--n-train",
        dest="texts",
        type=_at_least(1),
        help="training passages (>= 1; default %(default)s)",
    )
    g.add_argument(
        "--eval-texts",
        "--n-held",
        dest="eval_texts",
        type=_at_least(1),
        help="held-out passages (>= 1; default %(default)s)",
    )
    g.add_argument(
        "--max-chars",
        type=_at_least(1),
        help="passages are cut to this many characters (>= 1; default %(default)s)",
    )
    g.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="texts per forward pass (>= 1, default 8)"
    )
    g.add_argument(
        "--drop-first",
        type=_at_least(0),
        default=1,
        help="leave out the first N text tokens of each text (default 1)",
    )
    g.add_argument(
        "--massive",
        type=positive_number,
        help="massive-row filter: drop rows whose norm passes this x the point's median (default %(default)s)",
    )
    g = p.add_argument_group("points (one of)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--points", type=_at_least(1), help="K resid_post points of each model, evenly spaced over depth"
    )
    x.add_argument(
        "--depths", type=_depths, help="relative depths, e.g. 0.25,0.5,0.75 (each model's point_at_depth)"
    )
    x.add_argument(
        "--points-a", type=comma_list("point names"), help="points of A by name, e.g. resid_post.3,final"
    )
    g.add_argument("--points-b", type=comma_list("point names"), help="points of B by name (with --points-a)")
    g = p.add_argument_group("run")
    g.add_argument(
        "--maps",
        type=comma_list("map kinds", tuple(KIND_PARAMS)),
        help=f"map kinds, comma-separated: {', '.join(KIND_PARAMS)} (default %(default)s)",
    )
    g.add_argument("--out", help="results folder: results.json, report.html (default out/<command>)")
    g.add_argument(
        "--seed",
        type=_at_least(0),
        default=0,
        help="seed of the corpus split and of every seeded step (default 0)",
    )
    g.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default on)"
    )
    p.set_defaults(**{"texts": 32, "eval_texts": 16, "max_chars": 400, "maps": ["affine"], **defaults})  # fmt: skip


SHARED = tuple(f for f in Options.__dataclass_fields__ if f not in ("command", "own"))


def options_from(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    """`Options` from parsed arguments; contradictions exit 2 through `parser.error`."""
    if ns.tiny and (ns.a is not None or ns.b is not None):
        parser.error("--tiny runs the tiny random-init models: it cannot be combined with --a or --b")
    if (ns.points_a is None) != (ns.points_b is None):
        parser.error("--points-a and --points-b go together: give both")
    d = vars(ns).copy()
    d.pop("func", None)
    d.pop("parser", None)
    d["a"] = DEFAULT_A if d["a"] is None else d["a"]
    d["b"] = DEFAULT_B if d["b"] is None else d["b"]
    d["out"] = d["out"] or f"out/{d['cmd']}"
    command = d.pop("cmd")
    shared = {k: d.pop(k) for k in SHARED}
    return Options(command=command, **shared, own=d)


def refuse(command: str, msg: str) -> NoReturn:
    """Exit 2 with `msg`, the way argparse reports a bad option."""
    print(f"xlens-align {command}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)
