"""The main job end to end: `xlens-align demo --tiny` writes a complete, finite report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import xlens_align as xa
from xlens_align import cli


def test_demo_tiny_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--no-progress", "--n-train", "16", "--n-held", "6", "--max-chars", "200"]
    assert cli.main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    run = report["run"]
    assert run["corpus"]["checksum"] == xa.corpus.load("pydoc").checksum and run["seeds"] == {"seed": 0}
    assert run["packages"]["transformer-lens"] and report["settings"]["tiny"] is True
    for side in ("A", "B"):
        assert report["forward_check"][side]["logits_diff"] <= 1e-4
        assert report["forward_check"][side]["final_diff"] <= 1e-4
    assert report["coverage"]["chunks"] > 0 and report["coverage"]["char_coverage"] == pytest.approx(1.0)
    for label in ("filtered", "unfiltered"):
        assert (out / f"cka_{label}.html").stat().st_size > 10_000
        grid = report["cka"][label]
        assert grid["points_a"][0] == "embed" and len(grid["values"]) == len(grid["points_a"])
    maps = report["maps"]
    assert {"affine(cv)", "procrustes", "lowrank(32)", "shuffled_control"} <= set(maps)
    assert all(
        math.isfinite(maps[k]["r2"]) for k in ("affine(cv)", "procrustes", "lowrank(32)", "shuffled_control")
    )
    effects = report["effects"]
    assert [e["mode"] for e in effects] == ["patch", "patch", "inject"]
    assert all(math.isfinite(e[k]) for e in effects for k in ("ce_clean", "ce_patched", "ce_ablated", "kl"))
    assert all(e["n_tokens"] > 0 for e in effects)
    gen = report["generation"]
    assert all(isinstance(gen[k], str) and gen[k] for k in ("clean", "patched", "ablated"))
    printed = capsys.readouterr().out
    assert "forward check vs HF" in printed and "report:" in printed


def test_demo_rejects_unknown_options():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--dtype", "int8"])


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--n-train", "0", "integer >= 1, got 0"),
        ("--n-train", "-1", "integer >= 1, got -1"),
        ("--n-held", "0", "integer >= 1, got 0"),
        ("--n-held", "-1", "integer >= 1, got -1"),
        ("--max-chars", "-30", "integer >= 1, got -30"),
        ("--max-chars", "0", "integer >= 1, got 0"),
        ("--points", "1", "integer >= 2, got 1"),
        ("--points", "0", "integer >= 2, got 0"),
        ("--batch-size", "0", "integer >= 1, got 0"),
        ("--batch-size", "two", "integer >= 1, got 'two'"),
    ],
)
def test_demo_refuses_bad_counts_before_any_work(monkeypatch, capsys, option, value, expected):
    monkeypatch.setattr(cli, "cmd_demo", lambda args: pytest.fail("the demo ran on a bad option"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tiny", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an {expected}" in err


@pytest.mark.parametrize("given", [["--a", "some/model"], ["--b", "some/model"]])
def test_demo_refuses_tiny_with_explicit_models(monkeypatch, capsys, given):
    monkeypatch.setattr(cli, "cmd_demo", lambda args: pytest.fail("the demo ran with contradictory options"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tiny", *given])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tiny" in err and "cannot be combined with --a or --b" in err


class _Stop(Exception):
    pass


def test_demo_tiny_honours_device_and_dtype(monkeypatch, tmp_path):
    seen = {}

    def fake_tiny_pair(args):
        seen.update(device=args.device, dtype=args.dtype, a=args.a, b=args.b)
        raise _Stop

    monkeypatch.setattr(cli, "_tiny_pair", fake_tiny_pair)
    monkeypatch.setattr(cli, "_load_pair", lambda args: pytest.fail("--tiny loaded the full models"))
    with pytest.raises(_Stop):
        cli.main(["demo", "--tiny", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path)])
    assert seen["device"] == "cpu" and seen["dtype"] == "bfloat16"


def test_tiny_pair_passes_device_and_dtype_to_the_tiny_models(monkeypatch):
    import argparse

    import torch

    import xlens_align as xa

    calls = []
    monkeypatch.setattr(xa.testing, "tiny_llama", lambda **kw: calls.append(("llama", kw)) or "A")
    monkeypatch.setattr(xa.testing, "tiny_mistral", lambda **kw: calls.append(("mistral", kw)) or "B")
    monkeypatch.setattr(xa, "ModelPair", lambda a, b: (a, b))
    assert cli._tiny_pair(argparse.Namespace(device="cuda:1", dtype="bfloat16")) == ("A", "B")
    assert [name for name, _ in calls] == ["llama", "mistral"]
    assert all(kw["device"] == "cuda:1" and kw["dtype"] is torch.bfloat16 for _, kw in calls)


def test_demo_refuses_more_passages_than_the_corpus_has(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_tiny_pair", lambda args: pytest.fail("models loaded before the refusal"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tiny", "--n-held", "100000", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--n-held 100000" in err and "has only" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
            "argument --device: 'cuda",
        ),
        (
            ["--corpus", "/no/such/corpus.txt"],
            "--corpus '/no/such/corpus.txt': corpus '/no/such/corpus.txt' not found",
        ),
    ],
)
def test_demo_refuses_missing_devices_and_corpora(monkeypatch, capsys, tmp_path, given, expected):
    monkeypatch.setattr(cli, "_tiny_pair", lambda args: pytest.fail("models loaded before the refusal"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tiny", *given, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_refuses_an_out_folder_that_is_a_file(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_tiny_pair", lambda args: pytest.fail("models loaded before the refusal"))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tiny", "--out", str(tmp_path / "taken")])
    assert e.value.code == 2
    assert f"--out '{tmp_path / 'taken'}': cannot make that folder" in capsys.readouterr().err


def test_demo_refuses_passages_cut_too_short_to_leave_rows(monkeypatch, capsys, tmp_path, tiny_pair):
    monkeypatch.setattr(cli, "_tiny_pair", lambda args: tiny_pair)
    args = ["demo", "--tiny", "--no-progress", "--n-train", "4", "--n-held", "2", "--max-chars", "3"]
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--n-train 4 with --max-chars 3 leaves" in err and "needs at least 4: raise --max-chars" in err
