"""Remote runs against a real NDIF server on 127.0.0.1 (CPU): the ``ndif`` package in its own venv
(scripts/ndif/setup.sh), Redis, a Ray head with the controller and a CPU model actor per model,
the API, an S3 stand-in. Two tiny models (a Llama as A, a Mistral as B, each with its own
tokenizer) are saved to a temporary directory and deployed. Nothing here is skipped: if the
server cannot start, every test errors with the server's log. The server is stopped by PID at
the end, also when tests fail. The last test stops the API mid-run."""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_remote import deadline

import xlens_align as xa
from xlens_align.remote import client
from xlens_align.remote.local import LocalServer, tiny_checkpoint
from xlens_align.remote.model import RemoteModel

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France, Berlin of Germany and Rome of Italy.",
    "Residual streams carry the model's state from one layer to the next.",
    "Tokenizers cut the same text differently: 12345 apples, 678 pears!",
    "A short one.",
    "Patching writes mapped values into the stream and the loss says what survived.",
]
HELD = ["Some held out text about the capital of Spain.", "Another one, for the mean ablation!"]
TOL = 1e-5


@pytest.fixture(scope="session")
def ndif(tmp_path_factory):
    root = tmp_path_factory.mktemp("ndif-models")
    a = tiny_checkpoint(root / "tiny-llama", "llama", vocab_size=400, n_layers=3, d_model=64, seed=0)
    b = tiny_checkpoint(root / "tiny-mistral", "mistral", vocab_size=300, n_layers=2, d_model=48, seed=1)
    spare = tiny_checkpoint(root / "not-deployed", "llama", vocab_size=280, n_layers=1, d_model=32, seed=2)
    server = LocalServer([a, b])
    atexit.register(server.stop)  # also if the session dies before the fixture's teardown
    t0 = time.monotonic()
    try:
        with deadline(420):
            server.start()  # RuntimeError with the server's log: every test using it errors, none skip
    except BaseException:
        server.stop()
        raise
    up_s = time.monotonic() - t0
    try:
        yield SimpleNamespace(server=server, host=server.host, a=a, b=b, spare=spare, up_s=up_s)
    finally:
        t0 = time.monotonic()
        out = server.stop()
        print(f"\n[ndif] up in {up_s:.1f} s, stopped in {time.monotonic() - t0:.1f} s\n{out}")


@pytest.fixture(scope="module")
def models(ndif):
    local = SimpleNamespace(a=xa.load_model(ndif.a), b=xa.load_model(ndif.b))
    remote = SimpleNamespace(
        a=xa.load_model(f"remote:{ndif.a}", host=ndif.host, timeout=60),
        b=xa.load_model(f"remote:{ndif.b}", host=ndif.host, timeout=60),
    )
    return SimpleNamespace(
        local=xa.ModelPair(local.a, local.b),
        b_remote=xa.ModelPair(local.a, remote.b),
        both_remote=xa.ModelPair(remote.a, remote.b),
        remote=remote,
    )


def _count_requests(monkeypatch) -> list:
    calls: list = []
    trace = RemoteModel._trace

    def counted(self, *args, **kw):
        calls.append(self.name)
        return trace(self, *args, **kw)

    monkeypatch.setattr(RemoteModel, "_trace", counted)
    return calls


def test_remote_status_reports_the_deployments(ndif, models):
    states = xa.remote.deployment_states(ndif.host)
    for m in (models.remote.a, models.remote.b):
        assert states[m.model_key] == "RUNNING"
        assert xa.remote.model_status(m.model_key, ndif.host) == "RUNNING"
    assert (
        xa.remote.model_status("nnsight.modeling.transformers.TransformersModel:{}", ndif.host)
        == "NOT_DEPLOYED"
    )
    assert ndif.up_s < 240


def test_remote_collect_and_layer_grid_match_local(models, monkeypatch):
    calls = _count_requests(monkeypatch)
    pts_a, pts_b = ["embed", "resid_mid.1", "resid_post.2"], ["resid_pre.0", "resid_mid.1", "final"]
    kw = dict(batch_size=3, progress=False, drop_first=1)
    rows = {
        name: xa.activations.collect_all(pair, TEXTS, pts_a, pts_b, **kw)
        for name, pair in (("local", models.local), ("b", models.b_remote), ("both", models.both_remote))
    }
    assert calls.count(models.remote.b.name) == 4 and calls.count(models.remote.a.name) == 2  # one per batch
    ref = rows["local"]
    assert ref.n > 50
    for name in ("b", "both"):
        assert rows[name].n == ref.n
        assert torch.equal(rows[name].meta.pos_b, ref.meta.pos_b)
        for side in ("a", "b"):
            for p, x in getattr(ref, side).items():
                diff = (getattr(rows[name], side)[p] - x).abs().max().item()
                assert diff <= TOL, f"{name}: {side} {p} differs by {diff:.2e}"
    grids = [
        xa.similarity.layer_grid(
            pair, TEXTS, measure="cka", points_a=pts_a, points_b=pts_b, batch_size=3, progress=False
        )
        for pair in (models.local, models.both_remote)
    ]
    assert grids[0].values.shape == (3, 3) and torch.isfinite(torch.as_tensor(grids[0].values)).all()
    assert (torch.as_tensor(grids[0].values) - torch.as_tensor(grids[1].values)).abs().max().item() <= TOL


def _maps(pair):
    """Affine maps for 2 x 2 (source, target) cells, fit from one streamed pass over `pair`."""
    return xa.fitting.fit_grid(
        pair, TEXTS, ["resid_post.1", "resid_post.2"], ["resid_pre.1", "resid_post.1"], alpha=1.0
    )


def _same_effect(e, f, what):
    for k in ("ce_clean", "ce_patched", "ce_ablated", "kl", "top1_agreement", "recovered"):
        x, y = getattr(e, k), getattr(f, k)
        assert math.isfinite(x) and abs(x - y) <= TOL, f"{what}: {k} local {x!r} remote {y!r}"
    assert e.n_tokens == f.n_tokens > 20


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random tiny models: recovered's scale may invert
def test_remote_measure_and_grid_match_local(models, monkeypatch):
    maps = _maps(models.local)
    maps_remote = _maps(models.both_remote)  # fit from rows read remotely: the same maps
    for cell, mp in maps.items():
        assert (mp.transform(torch.eye(64)) - maps_remote[cell].transform(torch.eye(64))).abs().max() <= 1e-4
    m = maps[("resid_post.2", "resid_pre.1")]
    kw = dict(source="resid_post.2", target="resid_pre.1", texts=TEXTS, ablation_texts=HELD, batch_size=3)
    e_local = xa.effects.measure(models.local, m, **kw)
    assert abs(e_local.ce_patched - e_local.ce_clean) > 1e-4  # the patch does something measurable
    for name in ("b_remote", "both_remote"):
        _same_effect(e_local, xa.effects.measure(getattr(models, name), m, **kw), f"measure, {name}")
    calls = _count_requests(monkeypatch)
    gk = dict(texts=TEXTS, ablation_texts=HELD, batch_size=3, cells_per_forward=8)
    g_local = xa.effects.grid(models.local, maps, **gk)
    g_remote = xa.effects.grid(models.b_remote, maps, **gk)
    # B's requests: ONE for the mean ablation (the 2 held-out texts fit one batch; both targets are
    # read in that pass) and ONE per batch of texts carrying all 7 variants (clean, 2 ablated,
    # 4 patched cells): 6 texts in batches of 3
    n_b = calls.count(models.remote.b.name)
    assert n_b == 1 + 2, f"{n_b} requests to B"
    for metric in ("recovered", "kl", "top1", "ce_patched"):
        diff = (getattr(g_local, metric) - getattr(g_remote, metric)).abs().max().item()
        assert diff <= TOL, f"grid {metric} differs by {diff:.2e}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_remote_generate_matches_local(models):
    maps = _maps(models.local)
    m = maps[("resid_post.1", "resid_post.1")]
    kw = dict(source="resid_post.1", target="resid_post.1", max_new_tokens=6, ablation_texts=HELD)
    prompt = "The capital of France is Paris. The capital of Germany is"
    g_local = xa.generate(models.local, m, prompt, **kw)
    for pair in (models.b_remote, models.both_remote):
        g = xa.generate(pair, m, prompt, **kw)
        assert g["tokens"] == g_local["tokens"] and g["patched"] == g_local["patched"]
    assert len(g_local["tokens"]["clean"]) > 0


def test_remote_unknown_model_is_named(ndif):
    with deadline(60):
        t = time.monotonic()
        with pytest.raises(client.ModelNotDeployed, match=r"not-deployed.*NOT_DEPLOYED.*running there"):
            RemoteModel(ndif.spare, host=ndif.host)
        # past the status check, the server's own refusal is translated the same way
        m = RemoteModel(ndif.spare, host=ndif.host, check=False, timeout=30)
        m._checked = True
        ids, mask = m.to_tokens(TEXTS[:1])
        with pytest.raises(client.ModelNotDeployed, match="not deployed"):
            m.run_with_points(ids, mask, ["final"])
        assert time.monotonic() - t < 40


def test_remote_server_exception_carries_its_message(models):
    b = models.remote.b
    ids, mask = b.to_tokens(TEXTS[:2])
    bad = (torch.tensor([99]), torch.tensor([0]))  # row 99 of a batch of 2: fails on the server
    steps = [(b._envoy("model.layers.0"), "output", (bad, torch.zeros(1, b.d_model)), True)]
    with deadline(60), pytest.raises(client.ServerError, match="index 99 is out of bounds"):
        b._trace(ids, mask, steps, True)
    _, acts = b.run_with_points(ids, mask, ["final"])  # the deployment still serves
    assert acts["final"].shape == (2, ids.shape[1], b.d_model)


def test_remote_notebook_runs_against_the_server(ndif, monkeypatch):
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "remote.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    monkeypatch.setenv("NDIF_HOST", ndif.host)
    monkeypatch.setenv("XLENS_REMOTE_A", str(ndif.a))
    monkeypatch.setenv("XLENS_REMOTE_B", str(ndif.b))
    ns: dict = {}
    with deadline(300):
        for i, src in enumerate(cells):
            exec(compile(src, f"remote.ipynb[code cell {i}]", "exec"), ns)
    assert ns["diff"] <= TOL and ns["eff_remote"].n_tokens > 0
    assert abs(ns["eff_remote"].ce_patched - ns["eff_local"].ce_patched) <= TOL


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_remote_cli_demo_takes_a_remote_b(ndif, monkeypatch, tmp_path):
    from xlens_align import cli

    monkeypatch.setenv("NDIF_HOST", ndif.host)
    argv = ["demo", "--a", str(ndif.a), "--b", f"remote:{ndif.b}", "--n-train", "6", "--n-held", "3"]
    argv += ["--max-chars", "160", "--points", "2", "--out", str(tmp_path), "--no-progress"]
    with deadline(300):
        assert cli.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    check = report["checks"]["b"]  # the remote B against its own raw HF forward on the server
    assert check["logits_diff"] <= TOL and check["final_diff"] <= TOL
    assert all(math.isfinite(e["ce_patched"]) for e in report["effects"])


class Hammer:
    """Requests to `model` in a loop on a thread until one fails; records the first error and
    counts the requests that succeeded (so a wait can tell 'still serving' from 'hung')."""

    def __init__(self, model):
        self.model = model
        self.ids, self.mask = model.to_tokens(TEXTS * 8)
        self.errors: list = []
        self.ok, self.last_ok = 0, time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(1.0)
        assert not self.errors, self.errors

    def _run(self):
        try:
            while True:
                self.model.run_with_points(self.ids, self.mask, self.model.points)
                self.ok, self.last_ok = self.ok + 1, time.monotonic()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.errors.append((time.monotonic(), e))

    def first_error(self, within: float):
        self.thread.join(timeout=within)
        assert self.errors, (
            f"no error within {within:g} s ({self.ok} requests succeeded, the last "
            f"{time.monotonic() - self.last_ok:.0f} s ago)"
        )
        return self.errors[0]


def test_remote_model_actor_killed_mid_run_is_a_clear_error(ndif, models):
    """Killing the model actors under a stream of requests: the request in flight fails with a
    clear error within a bounded time, never hangs. A kill can land between two requests (the
    tiny model's forward is a small part of a request's time); then the next request waits for
    Ray's restart and succeeds, so the kill is repeated (at most 4 times) while requests keep
    succeeding. A request that neither fails nor succeeds for 60 s is a hang and fails the test."""
    b = models.remote.b
    hammer = Hammer(b)
    for attempt in range(4):
        pids = ndif.server.actor_pids()
        assert len(pids) == 2 if attempt == 0 else pids, pids  # later: whichever Ray has restarted
        killed, ok_before = time.monotonic(), hammer.ok
        for pid in pids:  # our own server's actors (found in the Ray session it started), by PID
            os.kill(pid, signal.SIGKILL)
        # until an error, or 2 requests served after the kill (it fell between requests: again)
        while not hammer.errors and hammer.ok < ok_before + 2:
            waited = time.monotonic() - max(killed, hammer.last_ok)
            assert waited < 60, f"kill {attempt + 1}: no error and no request served for {waited:.0f} s: a hang"
            time.sleep(0.2)
        if hammer.errors:
            break
    when, err = hammer.first_error(within=0)
    assert isinstance(err, client.ConnectionLost | client.RemoteTimeout), repr(err)
    assert when - killed < 60
    # Ray restarts the actors (max_restarts=-1): within a bounded time the deployment serves again
    ids, mask = b.to_tokens(TEXTS[:2])
    end = time.monotonic() + 120
    while True:
        try:
            _, acts = b.run_with_points(ids, mask, ["final"])
            break
        except client.RemoteRunError:
            assert time.monotonic() < end, "the deployment did not come back within 120 s"
            time.sleep(2)
    assert acts["final"].shape == (2, ids.shape[1], b.d_model)


def test_remote_api_stopped_mid_run_is_a_clear_error(ndif, models):
    """Runs last: it stops the API under a stream of requests (the session's teardown stops the rest)."""
    hammer = Hammer(models.remote.b)
    stopped = time.monotonic()
    ndif.server.stop("api")
    when, err = hammer.first_error(within=90)
    assert isinstance(err, client.ConnectionLost | client.ServerUnreachable | client.RemoteTimeout), repr(err)
    assert "NDIF host" in str(err) or ndif.host in str(err)
    assert when - stopped < 60
    with deadline(60), pytest.raises(client.ServerUnreachable):
        RemoteModel(ndif.b, host=ndif.host)
