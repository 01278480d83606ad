"""The main job end to end: `xlens-align demo --tiny` writes a complete, finite report."""

from __future__ import annotations

import json
import math

import pytest

from xlens_align import cli


def test_demo_tiny_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--no-progress", "--n-train", "16", "--n-held", "6", "--max-chars", "200"]
    assert cli.main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
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
    assert all(math.isfinite(maps[k]["r2"]) for k in ("affine(cv)", "procrustes", "lowrank(32)", "shuffled_control"))
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
