"""Bad files and model sources get errors naming the path, tensor, argument or device: map files
(round trips at every header length, damaged tensors, cut or garbage files, pickles never unpickled,
unwritable targets), hyper-parameters, checkpoints, tokenizers, devices, ids beyond the vocabulary."""

from __future__ import annotations

import json
import pickle
import random
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xlens_align as xa
from xlens_align.maps import CCA, MLP, Adapter, Affine, EmbeddingInjection, LowRank, Procrustes, load


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _p(path) -> str:
    """`path` as a regular expression matching itself."""
    return re.escape(str(path))


def _header(raw: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def _rewrite(path: Path, out: Path, edit) -> Path:
    """Copy map file `path` to `out` with its tensors changed by `edit(dict)` (metadata kept)."""
    _, header = _header(path.read_bytes())
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(out), metadata=header["__metadata__"])
    return out


@pytest.fixture(scope="module")
def fitted():
    X, Y = _rows(80, 5, 1), _rows(80, 3, 2)
    return {
        "affine": Affine(alpha=0.1, standardize=True, winsorize=0.99).fit(X, Y),
        "procrustes": Procrustes(scale=True, whiten="x").fit(X, Y),
        "low_rank": LowRank(rank=2).fit(X, Y),
        "cca": CCA(k=2).fit(X, Y),
        "mlp": MLP(hidden=8, epochs=1, progress=False).fit(X.float(), Y.float()),
        "injection": EmbeddingInjection(base="low_rank", base_params={"rank": 2}).fit(X, Y),
    }


# -- round trip: every header length mod 256 -----------------------------------------------------
@pytest.mark.parametrize("kind", ["affine", "procrustes", "cca", "mlp", "injection"])
def test_round_trip_over_300_provenance_lengths(fitted, kind, tmp_path):
    m = fitted[kind]
    X = _rows(4, 5, 3)
    want = m.transform(X)
    residues = set()
    for length in range(300):
        m.bind(note="x" * length)
        path = m.save(tmp_path / "m.safetensors")
        raw = path.read_bytes()
        residues.add(_header(raw)[0] % 256)
        back = load(path)
        assert back.provenance["note"] == "x" * length
        assert torch.equal(back.transform(X), want), length
    # safetensors pads its header to 8 bytes: every reachable length mod 256, 128 (first byte 0x80,
    # a pickle's mark) included
    assert residues == set(range(0, 256, 8))


def test_every_header_length_mod_256_loads(fitted, tmp_path):
    """Files from other writers may not pad the header: pad it by hand to every length mod 256."""
    good = fitted["cca"].save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    n, _ = _header(raw)
    want = load(good).transform(_rows(3, 5, 4))
    path = tmp_path / "padded.safetensors"
    for extra in range(256):
        head = raw[8 : 8 + n] + b" " * extra
        path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])
        assert torch.equal(load(path).transform(_rows(3, 5, 4)), want), extra


# -- damaged tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["affine weight_", "affine prep_x_.winsor_hi", "mlp net_.skip.weight", "cca x_weights_"]
)
def test_non_finite_tensor_is_named(fitted, spec, tmp_path):
    kind, name = spec.split()
    good = fitted[kind].save(tmp_path / "good.safetensors")
    for bad_value in (float("nan"), float("inf")):

        def poison(t, v=bad_value):
            t[name] = t[name].clone()
            t[name].view(-1)[0] = v

        bad = _rewrite(good, tmp_path / "bad.safetensors", poison)
        with pytest.raises(ValueError, match=rf"^{_p(bad)}: tensor '{_p(name)}' holds 1 non-finite"):
            load(bad)


MISSING = (
    "affine bias_|affine prep_x_.offset|affine prep_y_.scale|procrustes rotation_|procrustes prep_x_.whitener"
)


@pytest.mark.parametrize("spec", [*MISSING.split("|"), "low_rank components_", "mlp net_.head.weight"])
def test_missing_tensor_is_named(fitted, spec, tmp_path):
    kind, name = spec.split()
    good = fitted[kind].save(tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"^{_p(bad)}: .*needs tensor\(s\) \['{_p(name)}'\]"):
        load(bad)


def test_missing_tensor_of_an_injection_base_is_named(fitted, tmp_path):
    good = fitted["injection"].save(tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda t: t.pop("base_map_.singular_values_"))
    with pytest.raises(
        ValueError, match=r"bad\.safetensors: base_map_ .*'low_rank' map.*\['singular_values_'\]"
    ):
        load(bad)


SHAPES = "affine weight_ 4,3 5,3|affine bias_ 3,1 3|affine prep_x_.offset 3 5|cca correlations_ 3 2"


@pytest.mark.parametrize(
    "spec", [*SHAPES.split("|"), "low_rank singular_values_ 5 2", "mlp net_.body.0.weight 8,4 8,5"]
)
def test_wrong_shape_is_named(fitted, spec, tmp_path):
    kind, name, *sizes = spec.split()
    shape, want = ([int(x) for x in size.split(",")] for size in sizes)
    good = fitted[kind].save(tmp_path / "good.safetensors")

    def reshape(t):
        t[name] = torch.zeros(shape, dtype=t[name].dtype)

    bad = _rewrite(good, tmp_path / "bad.safetensors", reshape)
    msg = rf"^{_p(bad)}: tensor '{_p(name)}' has shape {_p(shape)}; .*d_in=5, d_out=3 needs {_p(want)}"
    with pytest.raises(ValueError, match=msg):
        load(bad)


def test_unexpected_tensor_is_named(fitted, tmp_path):
    good = fitted["affine"].save(tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda t: t.update(extra_=torch.zeros(2)))
    with pytest.raises(
        ValueError, match=r"bad\.safetensors: tensor\(s\) \['extra_'\] are not part of the 'affine' map"
    ):
        load(bad)


# -- truncated, garbage, pickles -----------------------------------------------------------------
def test_every_prefix_of_a_map_file_is_truncated_or_corrupt(fitted, tmp_path):
    m, cut = fitted["cca"], tmp_path / "cut.safetensors"
    raws = (m.bind(note="y" * k).save(tmp_path / "odd.safetensors").read_bytes() for k in range(256))
    raw = next(r for r in raws if r[0] == 0x80)  # header length 128 mod 256, a pickle's first byte
    for k in range(len(raw)):
        cut.write_bytes(raw[:k])
        with pytest.raises(ValueError, match=rf"^{_p(cut)} is truncated or corrupt: "):
            load(cut)


def test_garbage_files_are_truncated_or_corrupt(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "garbage.safetensors"
    cases = [b"", b"{}", b"\x00" * 8, b"\xff" * 64, struct.pack("<Q", 5) + b"[1,2]"]
    cases += [struct.pack("<Q", 20) + b'{"a": ' + bytes(rng.randrange(256) for _ in range(14))]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(60)]
    for data in cases:
        if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
            continue
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"^{_p(path)} is truncated or corrupt: "):
            load(path)


class _Trap(str):
    """Unpickling this creates the directory it names: proof that a file was unpickled."""

    def __reduce__(self):
        return (Path.mkdir, (Path(self),))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_are_refused_never_unpickled(tmp_path, protocol):
    marker = tmp_path / "unpickled"
    path = tmp_path / "trap.safetensors"
    path.write_bytes(pickle.dumps({"weight_": _Trap(str(marker))}, protocol=protocol))
    with pytest.raises(ValueError, match=rf"^{_p(path)} is a Python pickle.*refusing to unpickle"):
        load(path)
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"weight_": torch.zeros(2)}, zipped)
    with pytest.raises(ValueError, match=rf"^{_p(zipped)} is a zip archive.*refusing to unpickle"):
        load(zipped)
    assert not marker.exists()


# -- saving where nothing can be written ---------------------------------------------------------
def test_save_reports_the_real_problem_and_path(fitted, tmp_path, monkeypatch):
    m = fitted["affine"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(
        NotADirectoryError,
        match=rf"cannot write {_p(blocker)}/sub/m\.st: {_p(blocker)} is a file",
    ):
        m.save(blocker / "sub" / "m.st")
    with pytest.raises(IsADirectoryError, match=rf"cannot write {_p(tmp_path)}: it is a directory"):
        m.save(tmp_path)

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".m.st.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = tmp_path / "locked" / "m.st"
    with pytest.raises(
        PermissionError,
        match=r"cannot write .*locked/m\.st: cannot create a file in .*locked \(Permission denied\)",
    ) as err:
        m.save(target)
    assert ".tmp" not in str(err.value)


# -- hyper-parameters that are not finite or overflow --------------------------------------------
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda v: Affine(alpha=v), "alpha"),
        (lambda v: Affine(alpha="cv", alphas=(1.0, v)), "each of alphas"),
        (lambda v: LowRank(rank=2, alpha=v), "alpha"),
        (lambda v: CCA(k=2, reg=v), "reg"),
        (lambda v: Affine(whiten=True, whiten_eps=v), "whiten_eps"),
        (lambda v: MLP(lr=v, progress=False), "lr"),
        (lambda v: MLP(weight_decay=v, progress=False), "weight_decay"),
        (lambda v: Adapter(min_delta=v, progress=False), "min_delta"),
        (lambda v: EmbeddingInjection(base_params={"alpha": v}), "alpha"),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_non_finite_hyper_parameters_are_refused(make, name, value):
    X, Y = _rows(30, 4, 6).float(), _rows(30, 3, 7).float()
    with pytest.raises(ValueError, match=rf"^{_p(name)} must be a finite number"):
        make(value).fit(X, Y)


def test_seeds_and_switches_must_have_their_type():
    X, Y, nan = _rows(30, 4, 6), _rows(30, 3, 7), float("nan")
    for m, name in [(Affine(alpha="cv", seed=nan), "seed"), (MLP(seed="1", progress=False), "seed")]:
        with pytest.raises(TypeError, match=rf"^{name} must be an int, got"):
            m.fit(X.float(), Y.float())
    for m, name in [(Procrustes(scale="yes"), "scale"), (Affine(refit=1), "refit")]:
        with pytest.raises(TypeError, match=rf"^{name} must be True or False, got"):
            m.fit(X, Y)


def test_overflowing_alpha_and_moments_are_named():
    X, Y = _rows(30, 4, 8), _rows(30, 3, 9)
    for m in (Affine(alpha=1e308), LowRank(rank=2, alpha=1e308), Affine(alpha="cv", alphas=(1e308,))):
        with pytest.raises(
            ValueError, match=r"^alpha=1e\+308 is too large: n \* alpha over n=\d+ rows overflows"
        ):
            m.fit(X, Y)
    for m in (Affine(), Procrustes(), CCA(k=2)):
        with pytest.raises(ValueError, match=r"^(X holds|the second moments of X overflow)"):
            m.fit(X * 1e200, Y)
        with pytest.raises(ValueError, match=r"^(Y holds|the second moments of Y overflow)"):
            m.fit(X, Y * 1e200)


# -- model loading -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A 1-layer Mistral (d_model 32) saved with its tokenizer: (directory, tokenizer directory)."""
    hf, tok = xa.testing.tiny_hf("mistral", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=32)
    path = tmp_path_factory.mktemp("small") / "model"
    hf.save_pretrained(path)
    return path, tok


def _variant(small_dir, tmp_path: Path, edit) -> Path:
    """A copy of the small checkpoint (no tokenizer files) with its weights changed by `edit`."""
    src, _ = small_dir
    out = tmp_path / "variant"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    edit(weights)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_checkpoint_missing_misshaped_or_cut_weights_is_refused(small_dir, tmp_path):
    tok, name = small_dir[1], "model.layers.0.mlp.down_proj.weight"
    path = _variant(small_dir, tmp_path, lambda w: w.pop(name))
    with pytest.raises(ValueError, match=rf"checkpoint {_p(path)} .*{_p(name)} \(missing\)"):
        xa.load_model(str(path), tokenizer=tok)
    weights = {**load_file(str(small_dir[0] / "model.safetensors")), "model.norm.weight": torch.ones(5)}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    misshaped = rf"{_p(path)} .*model\.norm\.weight \(shape \[5\] in the file vs \[32\]"
    with pytest.raises(ValueError, match=misshaped):
        xa.load_model(str(path), tokenizer=tok)
    raw = (small_dir[0] / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {_p(path)}: .*truncated or corrupt"):
        xa.load_model(str(path), tokenizer=tok)


def _no_weights(*args, **kwargs):
    raise AssertionError("weights were read before the argument was checked")


def test_model_directory_without_tokenizer_suggests_tokenizer(small_dir, tmp_path, monkeypatch):
    path = _variant(small_dir, tmp_path, lambda w: None)
    monkeypatch.setattr(xa.packaged, "load_causal_lm", _no_weights)
    with pytest.raises(
        FileNotFoundError,
        match=rf"model directory '{_p(path)}' holds no tokenizer files.*tokenizer=",
    ):
        xa.load_model(str(path))
    empty = tmp_path / "empty_tokenizer"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=rf"tokenizer directory '{_p(empty)}' holds no tokenizer.*tokenizer=",
    ):
        xa.load_model(str(path), tokenizer=empty)
    monkeypatch.undo()
    assert xa.load_model(str(path), tokenizer=small_dir[1]).n_layers == 1  # given tokenizer= it loads


@pytest.mark.parametrize(
    "device", ["cuda:97", "gpu", "meta", "mps:5"] + ([] if torch.cuda.is_available() else ["cuda"])
)
def test_unavailable_device_is_refused_before_loading(small_dir, fitted, device, monkeypatch, tmp_path):
    path, tok = small_dir
    monkeypatch.setattr(xa.packaged, "load_causal_lm", _no_weights)
    monkeypatch.setattr(xa.models, "load_hf", _no_weights)
    with pytest.raises(ValueError, match=rf"device.*{re.escape(repr(device))}"):
        xa.load_model(str(path), tokenizer=tok, device=device)
    with pytest.raises(
        ValueError, match=rf"^device.*{re.escape(repr(device))}"
    ):  # not "truncated or corrupt"
        load(fitted["affine"].save(tmp_path / "m.safetensors"), device=device)


def test_tokenizer_beyond_the_vocabulary_is_refused():
    hf, _ = xa.testing.tiny_hf("mistral", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=32)
    llama = xa.tokenizers.llama3_path()
    with pytest.raises(
        ValueError,
        match=rf"tokenizer '{_p(llama)}' produces token ids up to 128255.*vocabulary of 32000",
    ):
        xa.load_model(hf, tokenizer=llama)


@pytest.mark.parametrize("bad", [32000, 128000, -1])
def test_ids_outside_the_vocabulary_are_named(small_dir, bad):
    path, tok = small_dir
    model = xa.load_model(str(path), tokenizer=tok)
    ids = torch.tensor([[1, 5, bad, 7]])
    want = rf"input_ids hold token id {bad}, outside the vocabulary .*vocabulary size 32000.*tokenizer '{_p(tok)}'"
    with pytest.raises(ValueError, match=want):
        model.forward(ids)
    with pytest.raises(ValueError, match=want):
        model.run_with_points(ids, torch.ones_like(ids), ["resid_post.0"])
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        model.forward(ids.float())
    assert model.forward(torch.tensor([[1, 31999]])).shape == (1, 2, 32000)


@pytest.mark.parametrize(
    "data",
    [
        b"GGUF" + struct.pack("<I", 6255337) + bytes(64),  # a version no reader knows
        b"GGUF" + struct.pack("<I", 3) + bytes(5),  # cut inside the header
        b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 50) + b"general.arch",  # cut in a key
        b"FUGG" + bytes(60),  # a bad magic
        b"",
    ],
)
def test_damaged_gguf_is_truncated_or_corrupt(tmp_path, data, monkeypatch):
    monkeypatch.setenv("XLENS_ALIGN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    damaged = rf"^{_p(path)} is (not a GGUF file, or it is )?truncated or corrupt: "
    with pytest.raises(ValueError, match=damaged):
        xa.load_model(str(path))
