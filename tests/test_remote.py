"""Remote models without a server: the point mapping (through nnsight's serialize / deserialize
dry run, ``host="local"``) equals the bridge's points and patches on tiny models of every
family, and every error path that needs no server is a clear error in bounded time."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import pytest
import torch

import xlens_align as xa
from xlens_align.patching import forward_patched
from xlens_align.remote import client
from xlens_align.remote.local import model_key, tiny_checkpoint
from xlens_align.remote.model import RemoteModel
from xlens_align.remote.writes import write_of as _write

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France!"]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test (instead of hanging the suite) if the block runs longer than `seconds`."""

    def boom(*_):
        raise TimeoutError(f"the test ran past its {seconds} s deadline")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-remote")
    return {
        fam: tiny_checkpoint(root / fam, fam, vocab_size=300 + 20 * i, n_layers=2, d_model=32, seed=i)
        for i, fam in enumerate(("llama", "mistral", "qwen2", "gemma3"))
    }


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3"])
def test_remote_points_and_patches_equal_the_bridge(checkpoints, family):
    path = checkpoints[family]
    local = xa.load_model(path)
    remote = xa.load_model(f"remote:{path}", host="local")
    assert remote.family == local.family == family
    assert (remote.points, remote.d_model, remote.n_layers) == (local.points, local.d_model, local.n_layers)
    assert remote.config_hash == local.config_hash and remote.model_id == local.model_id
    assert remote.model_key == model_key(path)
    ids, mask = local.to_tokens(TEXTS)
    assert torch.equal(ids, remote.to_tokens(TEXTS)[0]) and int(mask.sum()) < mask.numel()  # padded
    real = mask.bool()  # padding is never read (there the bridge's eager and HF's sdpa attention differ)
    lg_l, acts_l = local.run_with_points(ids, mask, local.points, return_logits=True)
    lg_r, acts_r = remote.run_with_points(ids, mask, remote.points, return_logits=True)
    # relative to the point's scale: HF's sdpa attention (remote) and the bridge's eager attention
    # round differently in float32 (~3e-7 of the values' size)
    worst = max(
        ((acts_l[p] - acts_r[p])[real].abs().max() / acts_l[p][real].abs().max().clamp(min=1)).item()
        for p in local.points
    )
    assert worst <= 1e-6, f"{family}: a remote point differs from the bridge's by {worst:.2e} (relative)"
    assert (acts_l["embed"] - acts_r["embed"])[real].abs().max().item() == 0.0  # gemma3's scaling included
    assert (lg_l - lg_r)[real].abs().max().item() <= 1e-5
    # the raw HF forward on the server (the CLI's forward check): hidden_states[-1] is `final`
    hf = remote.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(hf.hidden_states) == remote.n_layers + 1
    assert torch.equal(hf.hidden_states[-1][real], acts_r["final"][real]) and torch.equal(hf.logits, lg_r)
    # a write at every kind of point: the same logits as the bridge's hooks
    g = torch.Generator().manual_seed(0)
    cells = (torch.tensor([0, 1, 0]), torch.tensor([2, 1, 4]))
    for point in ("embed", "resid_pre.1", "resid_mid.1", "resid_post.0", "final"):
        spec = {point: (torch.randn(3, local.d_model, generator=g) * 3, cells)}
        patched_l = forward_patched(local, ids, mask, spec)
        patched_r = forward_patched(remote, ids, mask, spec)
        assert (patched_l - lg_l)[real].abs().max() > 1e-3, f"{point}: the patch changed nothing"
        assert (patched_l - patched_r)[real].abs().max().item() <= 1e-5, f"{family} {point}"


def test_remote_module_paths_exist_in_every_family(checkpoints):
    from transformers import AutoModelForCausalLM

    for family, path in checkpoints.items():
        names = dict(AutoModelForCausalLM.from_pretrained(path).named_modules())
        for kind, (template, side) in xa.remote.MODULE_PATHS[family].items():
            assert template.format(layer=1) in names, (family, kind)
            assert side in ("input", "output")
    assert xa.remote.MODULE_PATHS["gemma3"]["resid_mid"][0].endswith("pre_feedforward_layernorm")


@pytest.mark.filterwarnings("ignore:the ablation at:RuntimeWarning")
def test_remote_dry_run_pair_collect_and_measure_equal_local(checkpoints):
    a = xa.load_model(checkpoints["llama"])
    b_local = xa.load_model(checkpoints["mistral"])
    b_remote = xa.load_model(f"remote:{checkpoints['mistral']}", host="local")
    local, remote = xa.ModelPair(a, b_local), xa.ModelPair(a, b_remote)
    kw = dict(batch_size=2, progress=False)
    (pl,) = xa.collect(local, TEXTS, ["resid_post.1"], ["resid_mid.1", "final"], **kw)
    (pr,) = xa.collect(remote, TEXTS, ["resid_post.1"], ["resid_mid.1", "final"], **kw)
    assert pl.n == pr.n > 10
    for p in pl.b:
        assert (pl.b[p] - pr.b[p]).abs().max().item() <= 1e-6
    m = xa.maps.Affine(alpha=1.0).fit(pl.a["resid_post.1"], pl.b["resid_mid.1"])
    e = [
        xa.effects.measure(pair, m, source="resid_post.1", target="resid_mid.1", texts=TEXTS, ablation="zero")
        for pair in (local, remote)
    ]
    assert e[0].n_tokens == e[1].n_tokens > 0
    for k in ("ce_clean", "ce_patched", "ce_ablated", "kl", "top1_agreement"):
        assert abs(getattr(e[0], k) - getattr(e[1], k)) <= 1e-5, k


def test_remote_result_checks():
    m = RemoteModel.__new__(RemoteModel)
    m.name, m.host = "tiny", "http://127.0.0.1:1"
    good = torch.ones(1, 5, 8)
    restored = m._checked_result(good[0], torch.Size([1, 5]), 8, "resid_post.0")  # batch dim dropped
    assert restored.shape == (1, 5, 8)
    with pytest.raises(client.RemoteResultError, match=r"resid_post.0 came back with shape \(2, 5, 8\)"):
        m._checked_result(torch.ones(2, 5, 8), torch.Size([3, 5]), 8, "resid_post.0")
    bad = good.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(client.RemoteResultError, match="1 inf/NaN"):
        m._checked_result(bad, torch.Size([1, 5]), 8, "logits")
    with pytest.raises(client.RemoteResultError, match="not a tensor"):
        m._checked_result(None, torch.Size([1, 5]), 8, "logits")


def test_remote_bad_writes_fail_before_any_request():
    p = xa.points.Point("resid_post", 0)
    with pytest.raises(
        ValueError, match=r"cannot write values of shape \(3, 8\) into the stream at 'resid_post.0'"
    ):
        _write(p, torch.ones(3, 8), (torch.tensor([0, 1]), torch.tensor([0, 1])), (2, 4, 8), torch.float32)
    with pytest.raises(TypeError, match="a remote model takes tensors"):
        _write(p, lambda x: x, None, (2, 4, 8), torch.float32)
    idx, v = _write(p, torch.ones(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), (2, 4, 8), torch.float32)
    assert v.shape == (8, 8) and len(idx) == 2


def test_remote_errors_are_translated():
    from nnsight.intervention.backends.remote import RemoteError

    cases = {
        "Could not deploy this model. Remotable.describe_checkpoint() got ...": client.ModelNotDeployed,
        "Error submitting request to model deployment. Please try again later.": client.ConnectionLost,
        "Traceback ...\nIndexError: index 9 is out of bounds": client.ServerError,
    }
    for text, cls in cases.items():
        err = client.translate(RemoteError(text), "model 'x' on NDIF host h")
        assert type(err) is cls and "model 'x' on NDIF host h" in str(err)
    assert "IndexError: index 9" in str(client.translate(RemoteError(list(cases)[2]), "w"))
    assert isinstance(client.translate(ConnectionRefusedError(111, "refused"), "w"), client.ServerUnreachable)
    assert client.translate(KeyError("x"), "w") is None  # not a remote failure: raised as it is


def _silent_server() -> tuple[socket.socket, int]:
    """A socket that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(srv.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_remote_bad_hosts_fail_fast(checkpoints):
    path = checkpoints["llama"]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead = free.getsockname()[1]
    free.close()
    with deadline(60):
        t = time.monotonic()
        with pytest.raises(client.ServerUnreachable, match=f"127.0.0.1:{dead}"):
            RemoteModel(path, host=f"http://127.0.0.1:{dead}")
        # check=False: the status check comes before the first request, which fails the same way
        m = RemoteModel(path, host=f"http://127.0.0.1:{dead}", check=False)
        ids, mask = m.to_tokens(TEXTS)
        with pytest.raises(client.ServerUnreachable, match=f"127.0.0.1:{dead}"):
            m.run_with_points(ids, mask, ["final"])
        m._checked = True  # and past the check, the request itself (websocket) fails clearly too
        with pytest.raises(client.ServerUnreachable, match="cannot connect"):
            m.run_with_points(ids, mask, ["final"])
        assert time.monotonic() - t < 30
        srv, port = _silent_server()
        try:
            t = time.monotonic()
            with pytest.raises(client.RemoteTimeout, match="did not answer"):
                RemoteModel(path, host=f"http://127.0.0.1:{port}", connect_timeout=2)
            silent = RemoteModel(path, host=f"http://127.0.0.1:{port}", connect_timeout=2, check=False)
            silent._checked = True
            with pytest.raises(client.RemoteTimeout, match="did not answer"):
                silent.run_with_points(ids, mask, ["final"])
            assert time.monotonic() - t < 20
        finally:
            srv.close()


def test_remote_socket_closed_before_the_session_id_is_connection_lost(checkpoints, monkeypatch):
    """An API that stops as a request starts closes the websocket: the first message is empty
    (or not the session id). That is a ConnectionLost naming the host, not a JSON error."""
    import websocket

    class Closing:
        def __init__(self, first):
            self.first = first

        def recv(self):
            return self.first

        def settimeout(self, t):
            pass

        def close(self):
            pass

    m = RemoteModel(checkpoints["llama"], host="http://127.0.0.1:9", check=False)
    m._checked = True
    ids, mask = m.to_tokens(TEXTS[:1])
    for first in ("", "<html>gone</html>", '{"nope": 1}'):
        monkeypatch.setattr(websocket, "create_connection", lambda *a, first=first, **k: Closing(first))
        with pytest.raises(client.ConnectionLost, match=r"127.0.0.1:9: the websocket closed or sent no session id"):
            m.run_with_points(ids, mask, ["final"])


def test_remote_bad_arguments(checkpoints):
    path = checkpoints["llama"]
    with pytest.raises(ValueError, match="host must be an http"):
        RemoteModel(path, host="127.0.0.1:8001")
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        RemoteModel(path, host="local", timeout=0)
    with pytest.raises(FileNotFoundError, match="no local config"):
        RemoteModel("nobody/no-such-model", host="local")
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        xa.load_model(f"remote:{path}", host="local", device="cuda")
    with pytest.raises(TypeError, match="apply to remote models only"):
        xa.load_model(path, host="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="give a hub id or a model directory"):
        xa.load_model("remote:")
    m = RemoteModel(path, host="local")
    ids, mask = m.to_tokens(TEXTS)
    with pytest.raises(TypeError, match="fwd_hooks"):
        m.forward(ids, mask, fwd_hooks=[("final", lambda x, hook: x)])
    with pytest.raises(ValueError, match="unknown point"):
        m.run_with_points(ids, mask, ["resid_post.x"])
    with pytest.raises(AttributeError, match="no TransformerBridge"):
        m.bridge  # noqa: B018
    with pytest.raises(TypeError, match="it lacks"):
        xa.ModelPair(m, object())


def test_remote_local_server_deploy_file_and_arguments(checkpoints, tmp_path):
    from xlens_align.remote.local import LocalServer, _deploy_file, scripts_dir

    text = _deploy_file([checkpoints["llama"], checkpoints["mistral"]], scripts_dir())
    for fam in ("llama", "mistral"):
        assert f"model_key: '{model_key(checkpoints[fam])}'" in text
        assert f"checkpoint: {checkpoints[fam]}" in text
    assert text.count("actor_class: xlens_cpu_actor.CPUModelActor") == 2
    assert "@PATH@" not in text and "@MODELS@" not in text and "@SIZE_BYTES@" not in text
    server = LocalServer([checkpoints["llama"]])
    assert len(set(server.ports.values())) == 6 and server.host.startswith("http://127.0.0.1:")
    assert server.stop() == ""  # nothing started, nothing stopped
    with pytest.raises(TypeError, match="non-empty list of checkpoint directories"):
        LocalServer([])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LocalServer([tmp_path])


def test_remote_large_patches_are_split_by_rows(checkpoints, monkeypatch):
    path = checkpoints["llama"]
    local = xa.load_model(path)
    small = RemoteModel(path, host="local", max_request_bytes=1000)
    ids, mask = local.to_tokens(TEXTS * 3)  # 6 rows
    B, T = ids.shape
    g = torch.Generator().manual_seed(0)
    cells = (torch.arange(B).repeat_interleave(2), torch.tensor([1, 3] * B))
    specs = [
        {"resid_post.0": (torch.randn(2 * B, local.d_model, generator=g), cells)},
        {"resid_pre.1": (torch.randn(B, T, local.d_model, generator=g), mask.bool())},
        {"final": (torch.randn(B, T, local.d_model, generator=g), None)},
    ]
    calls = []
    trace = RemoteModel._trace
    monkeypatch.setattr(RemoteModel, "_trace", lambda self, *a, **k: calls.append(1) or trace(self, *a, **k))
    real = mask.bool()
    for spec in specs:
        calls.clear()
        out = forward_patched(small, ids, mask, spec)
        assert len(calls) > 1, "the patch was not split"
        assert (out - forward_patched(local, ids, mask, spec))[real].abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="max_request_bytes must be a positive int"):
        RemoteModel(path, host="local", max_request_bytes=0)


def test_remote_patch_block_equals_local(checkpoints):
    """`xa.patch` around forward() writes the same values on a remote model as hooks do locally."""
    path = checkpoints["llama"]
    local, remote = xa.load_model(path), xa.load_model(f"remote:{path}", host="local")
    ids, mask = local.to_tokens(TEXTS)
    real = mask.bool()
    cells = (torch.tensor([0, 1]), torch.tensor([1, 2]))
    vals = torch.randn(2, local.d_model, generator=torch.Generator().manual_seed(1)) * 3
    with xa.patch(local, "resid_post.0", vals, cells):
        want = local.forward(ids, mask)
    with xa.patch(remote, "resid_post.0", vals, cells):
        got = remote.forward(ids, mask)
        with pytest.raises(RuntimeError, match="would not see the patch"):
            remote.run_with_points(ids, mask, ["final"])
    clean = remote.forward(ids, mask)  # the block is closed: no write left behind
    assert (want - got)[real].abs().max().item() <= 1e-5
    assert (got - clean)[real].abs().max().item() > 1e-3
    assert (clean - local.forward(ids, mask))[real].abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="hidden size"), xa.patch(remote, "resid_post.0", vals[:, :3], cells):
        pass
