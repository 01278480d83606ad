"""`xlens-align`: every subcommand on the tiny models writes a complete, finite results.json and a
report.html with its figures; help exits 0, bad options exit 2 naming the option, an interrupted
run leaves no results. The subcommands run in-process, once each, into one shared folder."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

import xlens_align as xa
from xlens_align import cli
from xlens_align.cli import session

FAST = ["--tiny", "--no-progress", "--max-chars", "160"]
COMMANDS = ("demo", "coverage", "similarity", "fit", "effects", "adapter", "generate", "report")


def _numbers(obj, where="results"):
    """(path, value) of every number in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield where, obj


SETTINGS = {"settings", "rows", "controls"}  # null there means "off"


def _nulls(obj, where="results"):
    """Paths of null values whose dict carries no note (settings left out)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in SETTINGS:
                continue
            if v is None and not obj.get("note") and k not in ("note",):
                yield f"{where}.{k}"
            yield from _nulls(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nulls(v, f"{where}[{i}]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pair):
    """Run every subcommand once on the tiny models (the session's pair: the same models --tiny
    builds, loaded once); {command: (exit code, results dict, out dir)}."""
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setattr(session, "tiny_pair", lambda device, dtype: tiny_pair)
    argv = {
        "demo": ["demo", *FAST, "--texts", "8", "--eval-texts", "4", "--points", "3"],
        "coverage": ["coverage", *FAST, "--texts", "12", "--verify-every", "3"],
        "similarity": ["similarity", *FAST, "--texts", "6", "--points", "2", "--measures", "cka,svcca",
                       "--views", "raw,standardized", "--n-perm", "4", "--n-boot", "4", "--control-rows", "64"],
        "fit": ["fit", *FAST, "--texts", "6", "--eval-texts", "3", "--maps", "affine,procrustes",
                "--depths", "0.5,1.0"],
        "effects": ["effects", *FAST, "--texts", "6", "--eval-texts", "3", "--points", "2",
                    "--ablation-texts", "2", "--injection"],
        "adapter": ["adapter", *FAST, "--texts", "6", "--eval-texts", "3", "--val-texts", "2",
                    "--ablation-texts", "2", "--steps", "2", "--points-a", "resid_post.1",
                    "--points-b", "resid_post.2"],
    }  # fmt: skip
    out = {}
    try:
        _run_all(root, argv, out)
    finally:
        mp.undo()
    return out


def _run_all(root, argv, out):
    fit_dir = root / "fit"
    for name, args in argv.items():
        d = root / name
        code = cli.main([*args, "--out", str(d)])
        out[name] = (code, json.loads((d / "results.json").read_text()), d)
    maps = sorted((fit_dir / "maps").glob("*.safetensors"))
    d = root / "effects_files"
    code = cli.main(["effects", *FAST, "--texts", "2", "--eval-texts", "3", "--ablation-texts", "2",
                     "--map-files", *map(str, maps), "--out", str(d)])  # fmt: skip
    out["effects_files"] = (code, json.loads((d / "results.json").read_text()), d)
    d = root / "generate"
    code = cli.main(["generate", *FAST, "--texts", "4", "--ablation-texts", "2", "--max-new-tokens", "3",
                     "--map-files", str(maps[0]), "--prompt", "The capital of France is", "--out", str(d)])  # fmt: skip
    out["generate"] = (code, json.loads((d / "results.json").read_text()), d)


SECTIONS = {
    "demo": {"checks", "coverage", "similarity", "maps", "effects", "generations"},
    "coverage": {"coverage"},
    "similarity": {"similarity"},
    "fit": {"maps"},
    "effects": {"functional", "effects"},
    "effects_files": {"effects"},
    "adapter": {"adapter"},
    "generate": {"generations"},
}
FIGURES = {"demo": 2, "similarity": 8, "effects": 1}


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_subcommand_writes_finite_results_and_a_report(runs, name):
    code, res, out = runs[name]
    assert code == 0
    assert res["schema"] == 1 and res["command"] == name.split("_")[0]
    assert SECTIONS[name] <= set(res), set(res)
    assert not {
        "coverage",
        "similarity",
        "functional",
        "effects",
        "adapter",
        "generations",
        "maps",
    } - SECTIONS[name] & set(res)
    s = res["settings"]
    assert s["a"]["family"] == "llama" and s["b"]["family"] == "mistral" and s["b"]["vocab"] == 32000
    assert s["corpus"]["checksum"] == xa.corpus.load("pydoc").checksum and s["seed"] == 0
    assert s["run"]["packages"]["transformer-lens"] and s["wall_s"] > 0
    assert all(math.isfinite(v) for _, v in _numbers(res))
    assert not list(_nulls(res)), list(_nulls(res))
    html = (out / "report.html").read_text()
    assert html.count('class="plotly-graph-div"') >= FIGURES.get(name, 0)
    assert not list(out.glob(".*.tmp"))


def test_demo_numbers(runs):
    _, res, _ = runs["demo"]
    for side in ("a", "b"):
        c = res["checks"][side]
        assert c["logits_diff"] <= 1e-4 and c["final_diff"] <= 1e-4
        assert set(c["parity"]) == {"embed", "resid_pre", "resid_mid", "resid_post", "final", "logits"}
        assert max(c["parity"].values()) <= 1e-4
    assert res["coverage"]["chunks"] > 0 and res["coverage"]["char_coverage"] == pytest.approx(1.0)
    sims = res["similarity"]
    assert [(e["measure"], e["filtered"]) for e in sims] == [("cka", True), ("cka", False)]
    assert sims[0]["points_a"][0] == "embed" and len(sims[0]["values"]) == len(sims[0]["points_a"])
    assert [m["map_kind"] for m in res["maps"]] == [
        "affine(cv)",
        "procrustes",
        "lowrank(32)",
        "affine(cv), shuffled pairs",
    ]
    assert [e["map_kind"] for e in res["effects"]][2] == "injection"
    assert [e["mode"] for e in res["effects"]] == ["patch", "patch", "inject"]
    assert all(0 <= e["depth_a"] <= 1 and e["n_tokens"] > 0 for e in res["effects"])
    gen = res["generations"][0]
    assert all(isinstance(gen[k], str) and gen[k] for k in ("clean", "patched", "ablated"))


def test_coverage_matches_the_library(runs):
    _, res, _ = runs["coverage"]
    texts = xa.corpus.load("pydoc").texts[:12]
    want = xa.tokens.align(xa.tokenizers.llama3(), xa.tokenizers.mistral_v1(), texts).coverage()
    cov = res["coverage"]
    assert cov["n_texts"] == 12 and cov["mismatches"] == 0 and cov["verified_rows"] == 4
    for k, v in want.items():
        assert cov[k] == pytest.approx(v, rel=1e-12), k
    assert cov["coverage_a"] == pytest.approx(1 / want["tokens_per_chunk_a"])


def test_similarity_controls_and_measures(runs):
    _, res, _ = runs["similarity"]
    entries = res["similarity"]
    assert [(e["measure"], e["view"], e["filtered"]) for e in entries] == [
        (m, v, f) for m in ("cka", "svcca") for v in ("raw", "standardized") for f in (True, False)
    ]
    for e in entries:
        assert e["points_a"] == ["embed", "resid_post.0", "resid_post.3"]
        assert all(0 <= p <= 1 for row in e["p_values"] for p in row)
        assert all(
            lo <= hi
            for rl, rh in zip(e["ci_low"], e["ci_high"], strict=True)
            for lo, hi in zip(rl, rh, strict=True)
        )


def test_fit_saves_maps_that_load_and_score_as_recorded(runs):
    _, res, out = runs["fit"]
    rows = res["maps"]
    assert {(r["map_kind"], r["source"], r["target"]) for r in rows} == {
        (k, f"resid_post.{i}", f"resid_post.{i}") for k in ("affine", "procrustes") for i in (2, 3)
    }
    for r in rows:
        m = xa.maps.load(r["path"])
        assert m.kind == r["map_kind"] and m.provenance["source"] == r["source"]
        assert math.isfinite(r["score"]["r2"]) and -1 <= r["score"]["cosine"] <= 1


def test_effects_grid_and_saved_maps(runs):
    _, res, _ = runs["effects"]
    (f,) = res["functional"]  # one grid per --maps kind (affine by default); injection is a column of rows
    assert f["map_kind"] == "affine" and f["points_a"] == ["resid_post.0", "resid_post.3"]
    cells = {(e["source"], e["target"]): e for e in res["effects"] if e["map_kind"] == "affine"}
    for i, s in enumerate(f["points_a"]):
        for j, t in enumerate(f["points_b"]):
            assert f["recovered"][i][j] == pytest.approx(cells[s, t]["recovered"], abs=1e-12)
    inj = [e for e in res["effects"] if e["map_kind"] == "injection"]
    assert [e["target"] for e in inj] == ["embed", "embed"] and all(e["depth_b"] == 0 for e in inj)
    _, res2, _ = runs["effects_files"]
    assert sorted((e["map_kind"], e["source"]) for e in res2["effects"]) == sorted(
        (r["map_kind"], r["source"]) for r in runs["fit"][1]["maps"]
    )


def test_adapter_rows(runs):
    _, res, _ = runs["adapter"]
    rows = res["adapter"]
    assert [r["objective"] for r in rows] == ["closed form", "closed form", "ce", "kl"]
    assert all(r["source"] == "resid_post.1" and r["target"] == "resid_post.2" for r in rows)
    assert len({r["ce_clean"] for r in rows}) == 1 and all(len(r.get("history", [1])) >= 1 for r in rows)


def test_generate_with_a_saved_map(runs):
    _, res, _ = runs["generate"]
    (g,) = res["generations"]
    assert g["prompt"] == "The capital of France is" and g["map_kind"] in ("affine", "procrustes")
    assert all(isinstance(g[k], str) for k in ("clean", "patched", "ablated"))


def test_report_rebuilds_the_html(runs, capsys):
    _, _, out = runs["effects"]
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().count('class="plotly-graph-div"') >= 1
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(out / "nothing")])
    assert e.value.code == 2 and "no results to report" in capsys.readouterr().err


def test_an_interrupted_run_leaves_no_results(monkeypatch, tmp_path, capsys, tiny_pair):
    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "tiny_pair", lambda device, dtype: tiny_pair)
    monkeypatch.setattr(session.Run, "finish", stop)
    code = cli.main(["coverage", *FAST, "--texts", "3", "--out", str(tmp_path)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tiny_builds_the_pair_on_the_device_and_dtype(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(xa.testing, "tiny_llama", lambda **kw: calls.append(("llama", kw)) or "A")
    monkeypatch.setattr(xa.testing, "tiny_mistral", lambda **kw: calls.append(("mistral", kw)) or "B")
    monkeypatch.setattr(xa, "ModelPair", lambda a, b: (a, b))
    assert session.tiny_pair("cuda:1", torch.bfloat16) == ("A", "B")
    assert calls == [
        ("llama", {"n_layers": 4, "seed": 0, "device": "cuda:1", "dtype": torch.bfloat16}),
        ("mistral", {"n_layers": 4, "seed": 1, "device": "cuda:1", "dtype": torch.bfloat16}),
    ]


def test_help_exits_0_for_every_subcommand(capsys):
    for argv in ([], *([c] for c in COMMANDS)):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0
        assert "usage: xlens-align" in capsys.readouterr().out


def test_module_entry_point_runs():
    r = subprocess.run(
        [sys.executable, "-m", "xlens_align.cli", "fit", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--map-files" not in r.stdout and "--depths" in r.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--texts", "0"], "argument --texts/--n-train: expected an integer >= 1, got 0"),
        (["demo", "--n-held", "-1"], "argument --eval-texts/--n-held: expected an integer >= 1, got -1"),
        (["similarity", "--batch-size", "two"], "argument --batch-size: expected an integer >= 1, got 'two'"),
        (["effects", "--maps", "affine,rotation"], "argument --maps: unknown map kinds ['rotation']"),
        (["fit", "--depths", "0.5,1.5"], "argument --depths: expected numbers in [0, 1], got '1.5'"),
        (
            ["fit", "--depths", "0.5", "--points", "3"],
            "argument --points: not allowed with argument --depths",
        ),
        (["fit", "--points-a", "resid_post.1"], "--points-a and --points-b go together"),
        (["similarity", "--measures", "cka,nope"], "argument --measures: unknown measures ['nope']"),
        (["similarity", "--views", "raw,log"], "argument --views: unknown views ['log']"),
        (["demo", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["demo", "--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (["adapter", "--objectives", "mse"], "argument --objectives: unknown objectives ['mse']"),
        (["effects", "--massive", "-1"], "argument --massive: expected a finite number > 0"),
        (["demo", "--tiny", "--a", "x"], "--tiny runs the tiny random-init models: it cannot be combined"),
        (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got 0"),
        (["nonsense"], "argument COMMAND: invalid choice: 'nonsense'"),
    ],
)
def test_bad_options_exit_2_naming_the_option(monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(session.Run, "load_pair", lambda self: pytest.fail("models loaded on a bad option"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--eval-texts", "100000"], "--eval-texts 100000: corpus 'pydoc' has only"),
        (["adapter", "--texts", "190"], "--texts 190 (with 4 validation and 8 ablation passages): corpus"),
        (["coverage", "--corpus", "/no/such/corpus.txt"], "--corpus '/no/such/corpus.txt': corpus"),
    ],
)
def test_refusals_before_any_model_leave_no_folder(monkeypatch, capsys, tmp_path, argv, expected):
    monkeypatch.setattr(
        session.Run, "load_pair", lambda self: pytest.fail("models loaded before the refusal")
    )
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--tiny", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refusals_after_loading_name_the_option(monkeypatch, capsys, tmp_path, tiny_pair):
    monkeypatch.setattr(session, "tiny_pair", lambda device, dtype: tiny_pair)
    (tmp_path / "taken").write_text("x")
    cases = [
        (["fit", "--out", str(tmp_path / "taken")], f"--out '{tmp_path / 'taken'}': cannot make that folder"),
        (["fit", "--points-a", "resid_post.9", "--points-b", "final", "--out", str(tmp_path / "p")], "--points-a: "),
        (["effects", "--map-files", str(tmp_path / "taken"), "--out", str(tmp_path / "m")], "--map-files '"),
        (["demo", "--texts", "4", "--eval-texts", "2", "--max-chars", "3", "--out", str(tmp_path / "d")],
         "--texts 4 with --max-chars 3 leaves"),
    ]  # fmt: skip
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            cli.main([argv[0], "--tiny", "--no-progress", *argv[1:]])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(re.escape(expected), err), err


def test_depth_pairs_keep_their_partners():
    """Two depths on one block of a 4-layer A still pair with two blocks of a 30-layer B."""
    from types import SimpleNamespace

    from xlens_align.cli.options import options_from
    from xlens_align.points import point_at_depth

    class Model:
        def __init__(self, n):
            self.n_layers = n

        def point_at_depth(self, f):
            return point_at_depth(self.n_layers, f)

    ns = cli.parser().parse_args(["fit", "--depths", "0.5,0.6"])
    run = session.Run(options_from(ns, ns.parser))
    run.pair = SimpleNamespace(a=Model(4), b=Model(30))
    pa, pb = run.points(lambda m: pytest.fail("--depths was given"))
    want_b = [point_at_depth(30, 0.5), point_at_depth(30, 0.6)]
    assert pa == ["resid_post.2"] and pb == want_b and want_b[0] != want_b[1]
    assert run.pairs() == [("resid_post.2", want_b[0]), ("resid_post.2", want_b[1])]
    assert run.settings["points_a"] == pa and run.settings["points_b"] == pb
