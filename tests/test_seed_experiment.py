"""analyses/seed_experiment.py --quick: every map kind x depth, finite numbers, bootstrap intervals."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "analyses" / "seed_experiment.py"


@pytest.fixture(scope="module")
def seed_experiment():
    spec = importlib.util.spec_from_file_location("seed_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_has_every_kind_at_every_depth(seed_experiment, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: one intra-op thread avoids OpenMP spin-waits
    try:
        assert seed_experiment.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert res["schema"] == 1 and res["command"] == "seed_experiment"
    s = res["settings"]
    assert s["fit_tokens"] >= s["fit_tokens_asked"] == 400
    assert len(s["corpus"]["checksum"]) == 64 and "jargon" in s["corpus"]["name"]
    assert s["corpus"]["n_texts_eval"] == 4 and s["seed"] == 0
    depths = seed_experiment.DEPTHS
    got = {(r["depth"], r["map_kind"]) for r in res["effects"]}
    kinds = {"procrustes", "affine", "low_rank", "cca", "mlp", "adapter", "injection"}
    assert got == {(d, k) for d in depths for k in kinds}
    for r in res["effects"]:
        for key in ("recovered", "kl", "top1_agreement", "depth_a", "depth_b"):
            assert r[key] is not None and math.isfinite(r[key]), (r["map_kind"], r["depth"], key)
        for key in ("recovered_ci", "kl_ci", "top1_ci"):
            lo, hi = r[key]
            assert lo <= hi
        assert r["kl_ci"][0] <= r["kl"] <= r["kl_ci"][1]
        assert (r["target"] == "embed") == (r["map_kind"] == "injection")
    assert len(res["adapter"]) == len(depths) and {r["objective"] for r in res["adapter"]} == {"ce"}
    assert {(e["view"], e["filtered"]) for e in res["similarity"]} == {
        ("raw", False),
        ("raw", True),
        ("rms", False),
        ("standardized", False),
    }
    for kind in ("affine", "procrustes", "adapter"):  # the targets, measured and printed
        assert f"target: {kind} recovered >=" in printed
    assert "wall time" in printed
