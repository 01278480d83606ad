"""`xlens-align`: one command line over the library, one report per run.

    xlens-align demo            # the main job on SmolLM2-135M (A) vs Gemma 3 270M (B), pydoc text
    xlens-align demo --tiny     # the same on tiny random-init Llama / Mistral (seconds)
    xlens-align coverage | similarity | fit | effects | adapter | generate   (see each --help)
    xlens-align report out/demo # rebuild report.html from a results folder

Every subcommand takes the same model, text, point and run options and writes
<out>/results.json and <out>/report.html (default out/<command>).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import adapt, compare, demo, stitch
from .options import add_shared, options_from, refuse
from .session import Run

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, dict[str, Any]] = {
    "demo": {
        "help": demo.HELP,
        "description": demo.DESCRIPTION,
        "defaults": demo.DEFAULTS,
        "args": None,
        "run": demo.run,
    },
    "coverage": compare.COVERAGE,
    "similarity": compare.SIMILARITY,
    "fit": stitch.FIT,
    "effects": stitch.EFFECTS,
    "adapter": adapt.ADAPTER,
    "generate": adapt.GENERATE,
}


def _report(ns: argparse.Namespace) -> int:
    """`xlens-align report DIR`: rebuild DIR/report.html from DIR/results.json."""
    from xlens_align import report

    d = Path(ns.results_dir)
    try:
        path = report.write(d)
    except (OSError, ValueError) as e:
        refuse("report", f"{ns.results_dir!r}: {e}")
    print(f"report: {path}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlens-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        s = sub.add_parser(
            name, help=spec["help"], description=spec["description"],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        if spec["args"] is not None:
            spec["args"](s.add_argument_group(f"{name} options"))
        add_shared(s, **spec["defaults"])
        s.set_defaults(func=spec["run"], parser=s)
    r = sub.add_parser(
        "report", help="rebuild report.html from a results folder",
        description="Reads DIR/results.json (written by any subcommand) and writes DIR/report.html.\n\n"
        "  xlens-align report out/demo", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    r.add_argument("results_dir", metavar="DIR", help="a folder holding results.json")
    r.set_defaults(func=None, parser=r)
    return p


def _torchrun(opts: Any) -> None:
    """Under torchrun (``torchrun --nproc_per_node=N -m xlens_align.cli ...``): join the process
    group (gloo on the CPU, nccl with --device cuda, each process on cuda:LOCAL_RANK); the
    pipelines then share the texts out, progress and output come from rank 0 alone."""
    from xlens_align import distributed

    dev = distributed.init_from_env(opts.device)
    if distributed.active():
        opts.device, opts.progress = str(dev), opts.progress and distributed.is_main()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ns = parser().parse_args(argv)
    if ns.cmd == "report":
        return _report(ns)
    run_fn, sub = ns.func, ns.parser
    opts = options_from(ns, sub)
    _torchrun(opts)
    try:
        return int(run_fn(Run(opts)))
    except KeyboardInterrupt:
        print(f"\nxlens-align {ns.cmd}: interrupted; no results written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
