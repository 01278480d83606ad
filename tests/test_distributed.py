"""Statistics, maps, CKA grids and effects over 2 processes (torchrun, gloo, CPU) equal one process's.

One launch does every check: ``python -m torch.distributed.run --nproc_per_node=2`` runs this file
as a script (`_worker`). Both processes shard the texts and reduce; then the group is destroyed
and rank 0 runs the same calls in one process over all the texts, compares, and writes the
differences to a JSON file that the test reads. Rank 1 writes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xlens_align as xa
from xlens_align import distributed

TEXTS = [
    f"Passage {i}: the {w} river runs {i % 5 + 2} miles past the old mill, then turns north again."
    for i, w in enumerate(["quiet", "long", "cold", "wide", "slow", "green", "dark", "bright", "small"] * 2)
]
EVAL = [
    f"Note {i}: a {w} cat sat on {i + 1} mats while it rained."
    for i, w in enumerate(["red", "tan", "grey"] * 3)
]
HELD = [
    f"Held {i}: the {w} bird sings at dawn."
    for i, w in enumerate(["blue", "brown", "black", "white", "pale"])
]
PA, PB = ["embed", "resid_post.1", "resid_post.3"], ["resid_post.0", "resid_post.2", "resid_post.3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(pair) -> dict:
    """Every pipeline that shards and reduces, on the same texts (odd counts: shards differ in size)."""
    stats = xa.activations.accumulate(pair, TEXTS, PA, PB, batch_size=2, progress=False)
    maps = {kind: xa.fitting.fit_grid(pair, TEXTS, PA[1:], PB[1:], kind, batch_size=2) for kind in ("affine", "procrustes")}  # fmt: skip
    maps["affine_cv"] = xa.fitting.fit_grid(pair, TEXTS, PA[1:], PB[1:], "affine", alpha="cv", val_texts=HELD, batch_size=3)  # fmt: skip
    cka = xa.similarity.layer_grid(pair, TEXTS, points_a=PA, points_b=PB, batch_size=2, minibatch_size=None, progress=False)  # fmt: skip
    feat = xa.similarity.layer_grid(pair, TEXTS, "cka_feature", points_a=PA, points_b=PB, batch_size=2, progress=False)  # fmt: skip
    chunked = xa.similarity.layer_grid(pair, TEXTS, points_a=PA, points_b=PB, batch_size=4, minibatch_size=64, progress=False)  # fmt: skip
    pg = xa.effects.grid(pair, maps["affine"], EVAL, ablation_texts=HELD, batch_size=2, n_boot=50)
    eff = xa.effects.measure(pair, maps["procrustes"]["resid_post.3", "resid_post.2"], source="resid_post.3", target="resid_post.2", texts=EVAL, batch_size=2)  # fmt: skip
    # batches whose scale grows by 2**6 each: the processes' first batches (which fix each point's
    # power of two) differ, and the pooled sums must be brought to common exponents first
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(40, 8, generator=g) for _ in range(6)]
    scaled = [({"x": zk * 2.0 ** (6 * k)}, {"y": (zk @ torch.randn(8, 5, generator=g)) * 2.0 ** (-6 * k)}) for k, zk in enumerate(z)]  # fmt: skip
    mine = distributed.shard(scaled)
    src = {
        m: xa.similarity.grid_from_batches(mine, m, minibatch_size=None, pool=True)
        for m in ("cka", "cka_feature")
    }
    own = xa.similarity.grid_from_batches(mine, minibatch_size=None)  # pool=False: this process's batches
    return dict(stats=stats, maps=maps, cka=cka, feat=feat, chunked=chunked, pg=pg, eff=eff, src=src, own=own)


def _stats_tensors(g) -> dict[str, torch.Tensor]:
    out = {"n": torch.tensor(float(g.n))}
    for side, moms in (("a", g.moments_a), ("b", g.moments_b)):
        for p, m in moms.items():
            out[f"{side}:{p}:mean"], out[f"{side}:{p}:s"] = m.mean, m.s
    out |= {f"x:{a}:{b}": v for (a, b), v in g.cross.items()}
    return out


def _numbers(r: dict) -> dict[str, torch.Tensor]:
    """Everything compared, as float64 tensors keyed by name."""
    out = {f"stats/{k}": v for k, v in _stats_tensors(r["stats"]).items()}
    for kind, maps in r["maps"].items():
        for (s, t), m in maps.items():
            out[f"maps/{kind}/{s}/{t}/weight"], out[f"maps/{kind}/{s}/{t}/bias"] = m.weight_, m.bias_
    for k in ("cka", "feat", "chunked"):
        out[f"{k}/values"] = r[k].values
        out[f"{k}/n_tokens"] = torch.tensor(float(r[k].n_tokens))
    out |= {f"src/{m}": g.values for m, g in r["src"].items()}
    pg = r["pg"]
    for k in ("recovered", "kl", "top1", "ce_patched"):
        out[f"pg/{k}"] = pg.values(k)
    out["pg/ce_clean"] = torch.tensor(pg.ce_clean)
    out["pg/n_patched"] = torch.tensor(float(pg.extra["n_patched"]))
    out |= {f"pg/ci/{s}/{t}": torch.tensor(e.recovered_ci) for (s, t), e in pg.effects.items()}
    e = r["eff"]
    for k in ("ce_clean", "ce_patched", "ce_ablated", "recovered", "kl", "top1_agreement"):
        out[f"eff/{k}"] = torch.tensor(float(getattr(e, k)))
    return {k: v.detach().double().cpu() for k, v in out.items()}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to max(1, max |b|)."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    assert distributed.active() and distributed.world_size() == 2
    pair = xa.ModelPair(
        # two Mistral vocabularies: the Llama 3 tokenizer alone takes seconds to load per process
        xa.testing.tiny_mistral(n_layers=4, seed=0, sliding_window=None),
        xa.testing.tiny_mistral(n_layers=4, seed=1),
    )
    runs = _runs(pair)
    many, own_rows = _numbers(runs), runs["own"].n_tokens
    refused = []
    for kw in ({"measure": "cca"}, {"n_perm": 3}, {"view": "standardized"}):
        with pytest.raises(ValueError, match="under torch.distributed") as e:
            xa.similarity.layer_grid(pair, TEXTS, points_a=PA, points_b=PB, progress=False, **kw)
        refused.append(str(e.value))
    cli = ["similarity", "--tiny", "--texts", "6", "--batch-size", "2", "--no-progress", "--out"]
    assert xa.cli.main([*cli, str(Path(out) / f"cli{distributed.rank()}")]) == 0  # rank 1: writes nothing
    gathered: list = [None] * 2
    torch.distributed.all_gather_object(gathered, (many, list(distributed.shard_range(len(TEXTS), 2))))
    me = distributed.rank()
    torch.distributed.destroy_process_group()
    if me != 0:
        return
    os.environ["WORLD_SIZE"] = "1"  # one process from here on: the CLI must not join a group again
    assert not distributed.active()
    one = _numbers(_runs(pair))
    assert xa.cli.main([*cli, str(Path(out) / "cli_one")]) == 0
    cli_grids = [
        json.loads((Path(out) / d / "results.json").read_text())["similarity"] for d in ("cli0", "cli_one")
    ]
    (mine, r0), (theirs, r1) = gathered
    result = {
        "keys": sorted(one),
        "diff": {k: _diff(mine[k], one[k]) for k in one},
        "ranks_differ": max(float((mine[k] - theirs[k]).abs().max()) for k in one),
        "shards": [r0, r1],
        "refused": refused,
        "own_rows": own_rows,
        "cli": [[(e["n_rows"], e["values"]) for e in grids] for grids in cli_grids],
        "cka_chunked": [many["chunked/values"].tolist(), one["chunked/values"].tolist()],
    }
    with xa.files.atomic_path(Path(out) / "result.json") as tmp:
        tmp.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", __file__, str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text())


def test_two_processes_equal_one(launched):
    out, r = launched
    assert sorted(p.name for p in out.iterdir()) == ["cli0", "cli_one", "result.json"]  # rank 1 wrote nothing
    assert r["shards"] == [list(range(0, 8)), list(range(8, 18))]  # contiguous runs of 2-text blocks
    d = r["diff"]
    assert {k.split("/")[0] for k in d} == {"stats", "maps", "cka", "feat", "chunked", "pg", "eff", "src"}
    assert max(v for k, v in d.items() if k.startswith("stats/")) < 1e-10
    assert max(v for k, v in d.items() if k.startswith(("maps/", "cka/", "feat/", "src/"))) < 1e-6
    assert max(v for k, v in d.items() if k.startswith(("pg/", "eff/"))) < 1e-6
    assert d["cka/n_tokens"] == 0.0 and d["stats/n"] == 0.0 and d["pg/n_patched"] == 0.0
    assert r["ranks_differ"] == 0.0  # every process holds the same numbers
    assert r["own_rows"] == 3 * 40  # grid_from_batches without pool=True: rank 0's 3 batches alone


def test_cli_under_torchrun(launched):
    """`xlens-align similarity` inside the process group: the texts are shared out, rank 0 writes
    results.json, rank 1 nothing (its --out is never made); the same rows as one process, CKA
    within minibatch noise (the minibatches form per process: about 250 rows each here)."""
    _, r = launched
    (two, one) = r["cli"]
    assert [n for n, _ in two] == [n for n, _ in one] and one[0][0] > 400
    for (_, v2), (_, v1) in zip(two, one, strict=True):
        assert float((torch.tensor(v2) - torch.tensor(v1)).abs().max()) < 0.2


def test_row_keeping_grids_refused(launched):
    """Measures that keep rows, the controls and the standardized view need every row in one
    process: under torch.distributed they are refused, naming why."""
    _, r = launched
    assert ["'cca' keeps rows" in r["refused"][0], "controls" in r["refused"][1]] == [True, True]
    assert "standardized" in r["refused"][2]


def test_minibatches_form_within_a_process(launched):
    """With minibatch_size=m each process makes its own minibatches: the same tokens, another
    partition, so the grid differs from one process's by minibatch noise, not by more."""
    _, r = launched
    many, one = (torch.tensor(v) for v in r["cka_chunked"])
    assert r["diff"]["chunked/n_tokens"] == 0.0
    assert 0.0 < float((many - one).abs().max()) < 0.1


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_cover_every_text_once(world, monkeypatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for n in range(0, 23):
        for block in (1, 2, 4):
            parts = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                parts.append(distributed.shard_range(n, block))
            assert [i for p in parts for i in p] == list(range(n))  # contiguous, in rank order
            assert all(p.start % block == 0 for p in parts if len(p))  # whole blocks: whole batches
            assert max(map(len, parts)) - min(map(len, parts)) <= block


def test_shard_without_group_is_everything():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(TEXTS, 4) == TEXTS and distributed.shard_range(7, 3) == range(7)
    assert distributed.all_reduce_sum([torch.ones(2, dtype=torch.float32), 3, 2.5])[1:] == [3, 2.5]
    with pytest.raises(ValueError, match="block must be a positive int"):
        distributed.shard(TEXTS, 0)
    with pytest.raises(TypeError, match="texts must be a list"):
        distributed.shard("one text")


if __name__ == "__main__":
    _worker(sys.argv[1])
