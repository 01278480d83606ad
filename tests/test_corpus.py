"""Text corpora: pydoc default, .txt / folder / .jsonl / datasets sources, seeded splits, errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from xlens_align import corpus
from xlens_align.corpus import Corpus, load, split_passages
from xlens_align.files import atomic_path, held_out_count, split_indices


def test_pydoc_is_deterministic_prose_of_bounded_length():
    c = load("pydoc")
    again = load("pydoc")
    assert isinstance(c, Corpus) and c.name == "pydoc"
    assert c.texts == again.texts and c.train == again.train and c.held_out == again.held_out
    assert len(c) > 150 and sum(map(len, c)) > 200_000
    assert all(40 <= len(t) <= 1500 for t in c)
    assert all(t == t.strip() for t in c)
    assert len(set(c.texts)) == len(c)  # pydoc repeats some sections: duplicates are dropped
    joined = "\n".join(c)
    assert "*****" not in joined and "::=" not in joined  # headings and grammar blocks dropped
    assert ">>>" not in joined  # doctest blocks dropped
    assert "Assignment statements are used to (re)bind names to values" in joined
    short = load("pydoc", max_chars=400, min_chars=100)
    assert all(100 <= len(t) <= 400 for t in short) and len(short) > len(c)


# the pinned numbers of the shipped pydoc corpus (Python 3.11.7's reference manual)
PYDOC_PASSAGES = 220
PYDOC_CHARS = 245_609
PYDOC_CHECKSUM = "ef887d0dc1c245fac0165245044fc621d2e2a1d8a8c5c97d6a3b8e207a3aa4c9"


def test_pydoc_is_shipped_with_a_checksum_and_equals_the_interpreters_on_3_11_7():
    import gzip
    import hashlib
    from importlib import resources

    from xlens_align import passages

    raw = gzip.decompress(
        resources.files("xlens_align").joinpath("data", passages.PYDOC_TOPICS_FILE).read_bytes()
    )
    assert hashlib.sha256(raw).hexdigest() == passages.PYDOC_TOPICS_SHA256
    assert json.loads(raw) == passages.pydoc_topics()
    c = load("pydoc")
    assert (len(c), sum(map(len, c)), c.checksum) == (PYDOC_PASSAGES, PYDOC_CHARS, PYDOC_CHECKSUM)
    if sys.version_info[:3] == (3, 11, 7):  # the interpreter the text was taken from: same passages
        from pydoc_data.topics import topics

        assert passages.pydoc_topics() == topics
        assert c.texts == list(dict.fromkeys(corpus.pydoc_passages(topics=topics)))
        short = dict(max_chars=400, min_chars=100)
        assert corpus.pydoc_passages(**short) == corpus.pydoc_passages(topics=topics, **short)


def test_corpus_checksum_is_of_the_texts_in_order():
    import hashlib

    texts = ["first passage here", "second passage, é and 🙂"]
    c = load(texts, min_chars=1)
    h = hashlib.sha256()
    for t in texts:
        h.update(len(t.encode()).to_bytes(8, "little") + t.encode())
    assert c.checksum == h.hexdigest()
    assert load(texts[::-1], min_chars=1).checksum != c.checksum
    assert load(["first passage her", "esecond passage, é and 🙂"], min_chars=1).checksum != c.checksum
    assert load(texts, min_chars=1, seed=3).checksum == c.checksum  # the split seed is recorded apart


def test_damaged_shipped_corpus_is_refused(monkeypatch, tmp_path):
    import gzip

    from xlens_align import passages

    passages._shipped_topics.cache_clear()
    monkeypatch.setattr(passages, "PYDOC_TOPICS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="has sha256 4717ccc5.*expected 0000.*reinstall"):
        load("pydoc")
    monkeypatch.undo()
    passages._shipped_topics.cache_clear()
    (tmp_path / "data").mkdir()
    good = gzip.decompress(
        (passages.resources.files("xlens_align") / "data" / passages.PYDOC_TOPICS_FILE).read_bytes()
    )
    (tmp_path / "data" / passages.PYDOC_TOPICS_FILE).write_bytes(gzip.compress(good)[:5000])
    monkeypatch.setattr(passages.resources, "files", lambda pkg: tmp_path)
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        passages.pydoc_topics()
    monkeypatch.undo()
    passages._shipped_topics.cache_clear()
    assert len(load("pydoc")) == PYDOC_PASSAGES


def test_run_info_records_versions_seeds_and_corpus():
    import platform
    from importlib import metadata

    c = load("pydoc", seed=2)
    info = corpus.run_info(seed=7, corpus=c, split_seed=2)
    json.dumps(info)  # JSON values only
    assert info["python"] == platform.python_version()
    for pkg in ("torch", "transformers", "transformer-lens", "xlens-align"):
        assert info["packages"][pkg] == metadata.version(pkg)
    assert info["seeds"] == {"seed": 7, "split_seed": 2}
    assert info["corpus"] == {
        "name": "pydoc",
        "checksum": PYDOC_CHECKSUM,
        "passages": PYDOC_PASSAGES,
        "chars": PYDOC_CHARS,
        "train": len(c.train),
        "held_out": len(c.held_out),
        "seed": 2,
    }
    assert corpus.run_info()["corpus"] is None and corpus.run_info()["seeds"] == {}
    with pytest.raises(TypeError, match="corpus must be a Corpus"):
        corpus.run_info(corpus=["a list"])
    with pytest.raises(TypeError, match="seed must be an int"):
        corpus.run_info(seed=1.5)


def test_split_is_disjoint_complete_and_seeded():
    c = load("pydoc", seed=0, held_out=0.2)
    assert not set(c.train) & set(c.held_out)
    assert len(c.train) + len(c.held_out) == len(c)
    assert len(c.held_out) == round(0.2 * len(c))
    # both parts keep the corpus order
    pos = {t: i for i, t in enumerate(c.texts)}
    assert [pos[t] for t in c.held_out] == sorted(pos[t] for t in c.held_out)
    assert [pos[t] for t in c.train] == sorted(pos[t] for t in c.train)
    assert load("pydoc", seed=0, held_out=0.2).held_out == c.held_out
    assert load("pydoc", seed=1, held_out=0.2).held_out != c.held_out
    assert load("pydoc", split="train", seed=0, held_out=0.2) == c.train
    assert load("pydoc", split="held_out", seed=0, held_out=0.2) == c.held_out
    assert load("pydoc", split="test", seed=0, held_out=0.2) == c.held_out
    assert load("pydoc", split="all") == c.texts
    assert len(load("pydoc", held_out=5).held_out) == 5
    assert load("pydoc", held_out=0.0).held_out == []
    assert c.held_out_index == sorted(c.held_out_index) and "pydoc" in repr(c)


def test_txt_file_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    long = " ".join(f"Sentence number {i} is here." for i in range(40))
    f.write_text(
        f"First paragraph,\nwrapped over two lines.\n\n  \nok\n\n{long}\r\n\r\nLast one here.\n",
        encoding="utf-8",
    )
    texts = load(f, split="all", min_chars=5, max_chars=200)
    assert texts[0] == "First paragraph,\nwrapped over two lines."
    assert "ok" not in texts  # shorter than min_chars
    assert texts[-1] == "Last one here."
    middle = texts[1:-1]
    assert len(middle) > 1 and all(len(t) <= 200 for t in middle)
    assert " ".join(middle) == long  # split at sentence ends, nothing lost
    assert all(t.endswith(".") for t in middle)
    assert load(str(f), split="all", min_chars=1, max_chars=None)[2] == long


def test_gzipped_txt_file_reads_like_the_txt(tmp_path):
    import gzip

    body = "First paragraph,\nwrapped.\n\nSecond paragraph \u00e9t\u00e9 here.\n"
    (tmp_path / "a.txt").write_text(body, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(body.encode("utf-8")))
    plain, packed = load(tmp_path / "a.txt", min_chars=5), load(tmp_path / "a.txt.gz", min_chars=5)
    assert packed.texts == plain.texts == ["First paragraph,\nwrapped.", "Second paragraph \u00e9t\u00e9 here."]
    assert packed.checksum == plain.checksum
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        load(tmp_path / "bad.txt.gz")
    (tmp_path / "x.bin.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(ValueError, match="unsupported corpus file"):
        load(tmp_path / "x.bin.gz")


def test_folder_of_txt_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Paragraph from b.\n\nSecond of b.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Paragraph from a.", encoding="utf-8")
    (tmp_path / "sub" / "c.md").write_text("From the subfolder.", encoding="utf-8")
    (tmp_path / "skip.py").write_text("print('not a corpus file')", encoding="utf-8")
    texts = load(tmp_path, split="all", min_chars=1)
    assert texts == ["Paragraph from a.", "Paragraph from b.", "Second of b.", "From the subfolder."]


def test_jsonl_field(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": f"document number {i}", "body": f"body {i}"} for i in range(10)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    c = load(f, min_chars=1, held_out=0.3, seed=3)
    assert c.texts == [r["text"] for r in rows]
    assert len(c.held_out) == 3 and not set(c.train) & set(c.held_out)
    assert load(f, field="body", split="all", min_chars=1) == [r["body"] for r in rows]
    with pytest.raises(ValueError, match=r"d.jsonl:1: no field 'content'.*\['body', 'text'\]"):
        load(f, field="content")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is int"):
        load(bad, min_chars=1)
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load(bad, min_chars=1)


def test_datasets_sources(tmp_path):
    import datasets  # installed with transformer-lens

    ds = datasets.Dataset.from_dict(
        {"text": [f"row {i} of a dataset" for i in range(6)], "n": list(range(6))}
    )
    assert load(ds, split="all", min_chars=1) == ds["text"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load(tmp_path / "saved", split="all", min_chars=1) == ds["text"]
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0, 1])})
    assert load(dd, dataset_split="validation", split="all", min_chars=1) == ds["text"][:2]
    with pytest.raises(ValueError, match="no split 'test'"):
        load(dd, dataset_split="test")
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['text', 'n'\]\)"):
        load(ds, field="body")
    with pytest.raises(ValueError, match="column 'n' row 0 is int"):
        load(ds, field="n")


def test_missing_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load(tmp_path / "saved")
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load("hf:some/name")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="'pydocs' not found"):
        load("pydocs")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load(empty)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("short", encoding="utf-8")
    with pytest.raises(ValueError, match="min_chars=40"):
        load(tiny)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load(tmp_path / "empty_dir")
    other = tmp_path / "x.csv"
    other.write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported corpus file"):
        load(other)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load(binary)
    with pytest.raises(TypeError, match="spec must be"):
        load(42)
    with pytest.raises(TypeError, match=r"spec\[1\] must be a str"):
        load(["fine text", None])
    with pytest.raises(ValueError, match="held_out fraction"):
        load("pydoc", held_out=1.5)
    with pytest.raises(ValueError, match="nothing to train on"):
        load(["a single passage of text"], min_chars=1, held_out=1)
    with pytest.raises(ValueError, match="split must be"):
        load("pydoc", split="dev2")
    with pytest.raises(ValueError, match="min_chars"):
        load("pydoc", min_chars=500, max_chars=100)
    with pytest.raises(ValueError, match="dataset spec"):
        load("hf:")
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        load("pydoc", seed=1.5)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load("pydoc", limit=0)


def test_list_spec_limit_and_split_passages():
    texts = [f"text number {i} is long enough" for i in range(20)]
    c = load(texts, min_chars=1, limit=10, held_out=0.2)
    assert c.texts == texts[:10] and len(c.held_out) == 2
    assert load(["same text", "other", "same text"], min_chars=1, split="all") == ["same text", "other"]
    assert len(load(["same text", "same text"], min_chars=1, split="all", dedup=False)) == 2
    packed = split_passages(["aaa", "bbb", "ccc"], min_chars=1, max_chars=8, pack=True)
    assert packed == ["aaa\n\nbbb", "ccc"]
    assert split_passages(["x" * 25], min_chars=1, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]
    assert corpus.pydoc_passages(max_chars=None, min_chars=1)[0].startswith("Assert statements")


# ------------------------------------------------------------------------------ files: split, atomic


def test_split_indices_deterministic_disjoint_and_used_by_load():
    for n, held in ((1, 0.0), (2, 0.1), (10, 3), (101, 0.25)):
        train, held_idx = split_indices(n, held, seed=7)
        again = split_indices(n, held, seed=7)
        assert torch.equal(train, again[0]) and torch.equal(held_idx, again[1])
        assert not set(train.tolist()) & set(held_idx.tolist())
        assert sorted(train.tolist() + held_idx.tolist()) == list(range(n))
        assert train.tolist() == sorted(train.tolist()) and held_idx.tolist() == sorted(held_idx.tolist())
        assert len(held_idx) == held_out_count(held, n)
    assert split_indices(100, 0.2, seed=0)[1].tolist() != split_indices(100, 0.2, seed=1)[1].tolist()
    texts = [f"passage {i} is long enough" for i in range(30)]
    c = load(texts, min_chars=1, held_out=0.2, seed=4)
    assert c.held_out_index == split_indices(30, 0.2, seed=4)[1].tolist()
    assert c.train == [texts[i] for i in split_indices(30, 0.2, seed=4)[0].tolist()]


def test_atomic_path_leaves_no_file_when_the_body_raises(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and list(target.parent.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(target.parent.iterdir()) == [target]
    # published with the usual mode (mkstemp alone would leave it owner-only)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
