"""One run of a subcommand: corpus, texts, models, points, and the results it writes.

`Run` checks what can be checked before any model is loaded (the corpus and its passage counts,
the output folder), then loads the pair once, resolves the points once and collects the results;
`Run.finish` writes ``results.json`` (atomically) and ``report.html``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .options import Options, refuse
from .results import model_info, write

__all__ = ["Run", "Texts", "log"]


def log(msg: str = "") -> None:
    """Print on rank 0 only (under torchrun every process runs the subcommand)."""
    from xlens_align.distributed import is_main

    if is_main():
        print(msg, flush=True)


@dataclass
class Texts:
    """Passages cut to --max-chars: fit (train[:n]), val, ablation (the train passages after
    them) and held (held_out[:eval])."""

    fit: list[str]
    val: list[str]
    ablation: list[str]
    held: list[str]


def tiny_pair(device: str, dtype: Any) -> Any:
    """--tiny: the tiny random-init Llama (A, 4 layers, seed 0) and Mistral (B, 4 layers, seed 1)."""
    import xlens_align as xa

    a = xa.testing.tiny_llama(n_layers=4, seed=0, device=device, dtype=dtype)
    b = xa.testing.tiny_mistral(n_layers=4, seed=1, device=device, dtype=dtype)
    return xa.ModelPair(a, b)


class Run:
    """The state of one subcommand run; see the module docstring."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.t0 = time.time()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.out = Path(opts.out)
        self.corpus: Any = None
        self.pair: Any = None
        self.results: dict[str, Any] = {"schema": 1, "command": opts.command}
        self.settings: dict[str, Any] = {}
        self._raw: tuple[list[str], list[str]] = ([], [])

    # -- before any model ---------------------------------------------------------------------
    def refuse(self, msg: str) -> Any:
        refuse(self.opts.command, msg)

    def load_corpus(self) -> Any:
        import xlens_align as xa

        try:
            self.corpus = xa.corpus.load(self.opts.corpus, seed=self.opts.seed)
        except (OSError, ValueError) as e:
            self.refuse(f"--corpus {self.opts.corpus!r}: {e}")
        return self.corpus

    def texts(self, *, n_val: int = 0, n_ablation: int = 0, eval_texts: bool = True) -> Texts:
        """The run's passages; refuses counts the corpus cannot give (held-out ones only when
        `eval_texts`)."""
        o, c = self.opts, self.corpus if self.corpus is not None else self.load_corpus()
        n_eval = o.eval_texts if eval_texts else 0
        for opt, have, want in (
            ("--texts", len(c.train), o.texts + n_val + n_ablation),
            ("--eval-texts", len(c.held_out), n_eval),
        ):
            if have < want:
                extra = (
                    f" (with {n_val} validation and {n_ablation} ablation passages)"
                    if opt == "--texts"
                    else ""
                )
                self.refuse(
                    f"{opt} {getattr(o, opt[2:].replace('-', '_'))}{extra}: corpus {o.corpus!r} has only {have} such passages"
                )

        def cut(ts: Sequence[str]) -> list[str]:
            return [t[: o.max_chars] for t in ts]

        n, v = o.texts, n_val
        self.settings["corpus"] = {
            "name": c.name,
            "checksum": c.checksum,
            "n_texts_fit": n,
            "n_texts_eval": n_eval,
            "n_texts_val": v,
            "n_texts_ablation": n_ablation,
            "max_chars": o.max_chars,
        }
        return Texts(
            fit=cut(c.train[:n]),
            val=cut(c.train[n : n + v]),
            ablation=cut(c.train[n + v : n + v + n_ablation]),
            held=cut(c.held_out[:n_eval]),
        )

    @property
    def writes(self) -> bool:
        """Whether this process writes files: always, except ranks other than 0 under torchrun."""
        from xlens_align.distributed import is_main

        return is_main()

    def make_out(self) -> Path:
        if not self.writes:
            return self.out
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.refuse(f"--out {self.opts.out!r}: cannot make that folder ({e.strerror or e})")
        if not self.out.is_dir():
            self.refuse(f"--out {self.opts.out!r}: not a folder")
        return self.out

    # -- models and points --------------------------------------------------------------------
    def load_pair(self) -> Any:
        import torch

        import xlens_align as xa

        o = self.opts
        dtype = getattr(torch, o.dtype)
        what = f"tiny random-init Llama + Mistral ({o.device}, {o.dtype})" if o.tiny else f"A={o.a}, B={o.b}"
        log(f"== models ({what})")
        if o.tiny:
            self.pair = tiny_pair(o.device, dtype)
        else:
            self.pair = xa.ModelPair(
                *(self._load(xa, opt, src, dtype) for opt, src in (("--a", o.a), ("--b", o.b)))
            )
        a, b = self.pair.a, self.pair.b
        src_a, src_b = ("tiny_llama", "tiny_mistral") if o.tiny else (o.a, o.b)
        self.settings["a"], self.settings["b"] = model_info(src_a, a), model_info(src_b, b)
        for side, m in (("A", a), ("B", b)):
            log(f"{side}: {m!r}")
        return self.pair

    def _load(self, xa: Any, opt: str, source: str, dtype: Any) -> Any:
        try:
            return xa.load_model(source, device=self.opts.device, dtype=dtype)
        except (OSError, ValueError) as e:
            self.refuse(f"{opt} {source!r}: {e}")

    def points(
        self, default: Callable[[Any], list[str]], *, spaced_extra: Sequence[str] = ()
    ) -> tuple[list[str], list[str]]:
        """(points of A, points of B) from --points-a/-b, --depths or --points K (evenly spaced,
        after `spaced_extra`), else `default(model)`; unknown names exit 2 naming the option."""
        o, raw = self.opts, []
        for side, model in (("a", self.pair.a), ("b", self.pair.b)):
            if o.points_a is not None:
                names = o.points_a if side == "a" else o.points_b
                try:
                    pts = [model.point(p).name for p in names]
                except (ValueError, TypeError) as e:
                    self.refuse(f"--points-{side}: {e}")
            elif o.depths is not None:
                pts = [model.point_at_depth(f) for f in o.depths]
            elif o.points is not None:
                pts = [*spaced_extra, *model.spaced_points(o.points)]
            else:
                pts = default(model)
            raw.append(pts)
        self._raw = (raw[0], raw[1])
        out = [list(dict.fromkeys(pts)) for pts in raw]
        self.settings["points_a"], self.settings["points_b"] = out
        return out[0], out[1]

    def pairs(self) -> list[tuple[str, str]]:
        """The point pairs of the last `points` call: A's i-th with B's i-th (from the lists before
        duplicates were dropped, so two depths on one block of the smaller model still pair with
        two blocks of the larger); one point on a side pairs with every point of the other."""
        pa, pb = self._raw
        if len(pa) == 1 or len(pb) == 1:
            return list(dict.fromkeys((a, b) for a in pa for b in pb))
        if len(pa) != len(pb):
            self.refuse(f"points of A ({len(pa)}) and of B ({len(pb)}) pair one to one: give as many of each")
        return list(dict.fromkeys(zip(pa, pb, strict=True)))

    # -- the end --------------------------------------------------------------------------------
    def row_settings(self, massive: float | None) -> dict[str, Any]:
        return {"drop_first": self.opts.drop_first, "massive": massive}

    def finish(self) -> int:
        """Write results.json and report.html; print where they are."""
        import xlens_align as xa
        from xlens_align import report

        o = self.opts
        self.settings.update(
            seed=o.seed,
            device=o.device,
            dtype=o.dtype,
            batch_size=o.batch_size,
            rows=self.settings.get("rows", self.row_settings(o.massive)),
            options=o.settings(),
            run=xa.corpus.run_info(seed=o.seed, corpus=self.corpus),
            started=self.started,
            wall_s=round(time.time() - self.t0, 3),
        )
        self.results["settings"] = self.settings
        if not self.writes:  # torchrun: rank 0 writes the results
            return 0
        path = write(self.out, self.results)
        html = report.write(self.out)
        log(f"\nresults: {path}\nreport:  {html}\ndone in {time.time() - self.t0:.1f} s")
        return 0
