"""The Llama 3 and Mistral v0.1 tokenizers against Meta's and SentencePiece's reference encoders."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
from pathlib import Path

import pytest

# The reference encoders are installed by scripts/setup.sh (CI included): no skipping.
import sentencepiece  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer as MetaLlama3Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import xlens_align.tokenizers as tokenizers_mod  # noqa: E402

T = tokenizers_mod
N_TEXTS = 1200

# ------------------------------------------------------------------------------------ test texts

CODE = [
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    'const greet = (name) => `Hello, ${name}!`;\nconsole.log(greet("world"));',
    '{"id": 42, "tags": ["a", "b"], "ok": true, "ratio": 0.75, "none": null}',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo "$f"; done\n',
    '<div class="card"><p>Text &amp; more</p></div>',
    'fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!("{:?}", v);\n}',
    "x = [i for i in range(10) if i % 2 == 0]\r\nprint(x)\r\n",
    "    if (a != b && c <= d || !e) { return -1; }",
    "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n",
    "\\begin{equation} E = mc^2 \\end{equation} $\\alpha + \\beta_{ij}$",
    "path = r'C:\\Users\\name\\file.txt'; url = 'https://example.org/a?b=1&c=2#frag'",
    "class Foo(Base):\n\t'''Doc.'''\n\n\tdef __init__(self):\n\t\tsuper().__init__()\n",
    "a += 1; b -= 2; c *= 3; d /= 4; e //= 5; f **= 6; g %= 7; h @= m",
]
EMOJI = [
    "😀",
    "👍",
    "👍🏽",
    "👋🏿",
    "🧑🏻‍💻",
    "👨‍👩‍👧‍👦",
    "👩‍❤️‍💋‍👨",
    "🏳️‍🌈",
    "🏴‍☠️",
    "🇯🇵",
    "🇩🇪",
    "1️⃣",
    "❤️",
    "✨",
    "🔥🔥🔥",
    "🙏🏼",
    "🤷‍♀️",
    "🧔🏾‍♂️",
    "🐍",
    "🚀",
    "🫠",
    "☕",
    "🎉🎊",
]
CJK = [
    "你好，世界！",
    "我们今天去公园散步。",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストです。",
    "東京は日本の首都です",
    "カタカナとひらがな",
    "한국어 문장입니다.",
    "안녕하세요, 반갑습니다!",
    "中文、日本語、한국어",
    "「引用」と『二重引用』",
    "１２３４５ＡＢＣ",
    "漢字テスト：龍、鬱、𠮷",
]
RTL = [
    "مرحبا بالعالم",
    "اللغة العربية جميلة جداً.",
    "السَّلَامُ عَلَيْكُمْ",
    "١٢٣٤٥ رقم",
    "שלום עולם",
    "עִבְרִית עם ניקוד",
    "זה משפט בעברית, עם פסיק.",
    "English مع العربية mixed",
]
ACCENTED = [
    "Crème brûlée à la française",
    "Ça va? Très bien, merci.",
    "Größe, Straße, Übermäßig",
    "Zażółć gęślą jaźń",
    "Þórsmörk og Ísland",
    "Tiếng Việt có dấu",
    "niño, señor, año",
    "Ångström, Øre, Æble",
    "e\u0301te\u0301 (decomposed)",
    "Příliš žluťoučký kůň",
    "İstanbul ığdır",
    "naïve coöperate façade résumé",
    "ŒUVRE œuvre ŸŶŴ",
]
SPECIAL = [
    "<s>",
    "</s>",
    "<unk>",
    "<s>[INST] hi [/INST]</s>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|reserved_special_token_7|>",
    "<|python_tag|>print(1)<|eom_id|>",
    "<0x41><0x0A>",
    "<|image|>",
    "<pad>",
    "▁",
    "a▁b ▁▁c",
]
WHITESPACE = [
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    "\r\n",
    " \t \n ",
    "\u00a0",
    "\u3000",
    "\u2009thin",
    "a\u200bb",
]
SEPARATORS = ["", " ", "  ", "\n", "\n\n", "\t", " \t", "   ", ", ", ". ", "\r\n", " \n  "]


def _prose_passages() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _number(rng: random.Random) -> str:
    forms = [
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
        lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}",
        lambda: f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1900, 2099)}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: (
            f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}"
        ),
        lambda: f"${rng.randint(0, 9999)}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.uniform(0, 10):.3e}",
        lambda: f"{rng.randint(0, 100)}%",
        lambda: f"+1 ({rng.randint(200, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
        lambda: f"0x{rng.randint(0, 2**32):08X}",
        lambda: "3.14159265358979323846",
        lambda: f"{rng.randint(1, 9)}½ × {rng.randint(1, 9)}² ≈ {rng.randint(1, 99)}°C",
    ]
    return rng.choice(forms)()


def _fragment(rng: random.Random, prose: list[str]) -> str:
    kind = rng.choice(
        ["prose", "prose", "prose", "code", "number", "emoji", "cjk", "rtl", "accent", "ws", "special"]
    )
    if kind == "prose":
        passage = rng.choice(prose)
        start = rng.randrange(max(1, len(passage) - 50))
        return passage[start : start + rng.randint(20, 400)]
    if kind == "code":
        return rng.choice(CODE)
    if kind == "number":
        return _number(rng)
    if kind == "emoji":
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == "ws":
        return rng.choice(WHITESPACE) * rng.randint(1, 5)
    return rng.choice({"cjk": CJK, "rtl": RTL, "accent": ACCENTED, "special": SPECIAL}[kind])


def make_texts(n: int = N_TEXTS, seed: int = 1234) -> list[str]:
    """Deterministic varied texts: prose, code, numbers, emoji, CJK, RTL, accents, whitespace runs,
    literal special-token strings, mixed with varied separators and leading/trailing whitespace."""
    rng = random.Random(seed)
    prose = _prose_passages()
    fixed = ["", "hi", "Hello world", " lead", "trail ", "  both  ", *WHITESPACE, *SPECIAL, *CODE[:3]]
    fixed += [" " * k for k in range(1, 40, 3)] + [f"a{' ' * k}b" for k in range(1, 40, 2)]
    texts = list(fixed)
    while len(texts) < n:
        parts = [_fragment(rng, prose) for _ in range(rng.randint(1, 4))]
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        if rng.random() < 0.2:
            text = rng.choice(["", " ", "  ", "\n", "\t"]) + text
        if rng.random() < 0.3:
            text = text.rstrip() if rng.random() < 0.5 else text + rng.choice([" ", "\n", "  ", "\t\n"])
        texts.append(text)
    return texts[:n]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache directory, so every run exercises the build, save and reload path."""
    return tmp_path_factory.mktemp("xlens_align_cache")


@pytest.fixture(scope="module")
def llama(cache: Path):
    return T.llama3(cache)


@pytest.fixture(scope="module")
def mistral(cache: Path):
    return T.mistral_v1(cache)


@pytest.fixture(scope="module")
def meta_llama() -> MetaLlama3Tokenizer:
    return MetaLlama3Tokenizer(T.llama3_model_file())


@pytest.fixture(scope="module")
def spm():
    return sentencepiece.SentencePieceProcessor(model_file=str(T.mistral_v1_model_file()))


def _mismatches(
    got: list[list[int]], want: list[list[int]], texts: list[str]
) -> list[tuple[str, list, list]]:
    return [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]


# ------------------------------------------------------------------------------------ the texts


def test_texts_cover_all_categories(texts: list[str]) -> None:
    joined = "".join(texts)
    assert len(texts) >= 1000 and len(set(texts)) > 0.9 * len(texts)
    for probe in ["\u200d", "🏽", "你", "ع", "ש", "é", "\t", "\n\n", "   ", "<s>", "<|eot_id|>", "def ", "-"]:
        assert probe in joined, probe
    assert any(t.startswith(" ") for t in texts) and any(t.endswith(" ") for t in texts)
    assert sum(any(ch.isdigit() for ch in t) for t in texts) > 100


def test_constants_match_meta_tokenizer(meta_llama: MetaLlama3Tokenizer) -> None:
    assert meta_llama.special_tokens == {name: 128000 + i for i, name in enumerate(T.LLAMA3_SPECIAL_TOKENS)}
    assert len(T.LLAMA3_SPECIAL_TOKENS) == 256
    assert T.LLAMA3_PATTERN == MetaLlama3Tokenizer.pat_str
    assert (meta_llama.bos_id, meta_llama.eos_id) == (T.LLAMA3_BOS_ID, T.LLAMA3_EOS_ID)


# ------------------------------------------------------------------------------------ parity


def test_llama3_ids_match_meta(llama, meta_llama: MetaLlama3Tokenizer, texts: list[str]) -> None:
    got = llama(texts).input_ids
    want = [meta_llama.encode(t, bos=True, eos=False) for t in texts]
    bad = _mismatches(got, want, texts)
    print(f"llama3 parity: {len(texts) - len(bad)}/{len(texts)} texts match Meta's tokenizer")
    assert not bad, bad[:3]


def test_mistral_v1_ids_match_sentencepiece(mistral, spm, texts: list[str]) -> None:
    got = mistral(texts).input_ids
    want = [[T.MISTRAL_V1_BOS_ID, *ids] for ids in spm.encode(texts)]
    bad = _mismatches(got, want, texts)
    print(f"mistral_v1 parity: {len(texts) - len(bad)}/{len(texts)} texts match sentencepiece")
    assert not bad, bad[:3]


def test_long_whitespace_runs(mistral, spm, llama, meta_llama: MetaLlama3Tokenizer) -> None:
    runs = [f"{a}{' ' * k}{b}" for k in range(1, 70) for a, b in [("", ""), ("x", "y"), ("\n", "\t")]]
    assert not _mismatches(mistral(runs).input_ids, [[1, *ids] for ids in spm.encode(runs)], runs)
    want = [meta_llama.encode(t, bos=True, eos=False) for t in runs]
    assert not _mismatches(llama(runs).input_ids, want, runs)


# ------------------------------------------------------------------------------------ round trip


def test_llama3_round_trip(llama, meta_llama: MetaLlama3Tokenizer, texts: list[str]) -> None:
    ids = llama(texts).input_ids
    checked = 0
    for text, seq in zip(texts, ids, strict=True):
        if meta_llama.decode(meta_llama.encode(text, bos=False, eos=False)) != text:
            continue
        checked += 1
        assert llama.decode(seq, skip_special_tokens=True) == text
        assert llama.decode(seq[1:]) == text
    assert checked == len(texts)  # byte-level BPE round-trips everything


def test_mistral_v1_round_trip(mistral, spm, texts: list[str]) -> None:
    ids = mistral(texts).input_ids
    checked = 0
    for text, seq in zip(texts, ids, strict=True):
        # The decoders agree even where the text does not come back (e.g. a literal "▁").
        assert mistral.decode(seq, skip_special_tokens=True) == spm.decode(seq[1:])
        if spm.decode(spm.encode(text)) != text:
            continue
        checked += 1
        assert mistral.decode(seq, skip_special_tokens=True) == text
    assert checked > 0.95 * len(texts)


# ------------------------------------------------------------------------------------ BOS, EOS


@pytest.mark.parametrize(
    ("name", "bos", "eos", "bos_id", "eos_id", "vocab"),
    [
        ("llama", "<|begin_of_text|>", "<|end_of_text|>", 128000, 128001, 128256),
        ("mistral", "<s>", "</s>", 1, 2, 32000),
    ],
)
def test_bos_eos(request, name: str, bos: str, eos: str, bos_id: int, eos_id: int, vocab: int) -> None:
    tok = request.getfixturevalue(name)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == (bos, eos, bos_id, eos_id)
    assert len(tok) == vocab and tok.pad_token is None and tok.add_bos_token
    assert tok("hi").input_ids[0] == bos_id
    assert tok("").input_ids == [bos_id]
    assert tok("hi", add_special_tokens=False).input_ids[0] != bos_id
    assert tok("hi").input_ids[1:] == tok("hi", add_special_tokens=False).input_ids
    assert eos_id not in tok("a b c").input_ids
    # Literal special-token text is tokenized as text, never as the special token.
    assert tok(f"{bos}{eos}").input_ids.count(bos_id) == 1 and eos_id not in tok(f"{bos}{eos}").input_ids
    assert [seq[0] for seq in tok(["one", "two three"]).input_ids] == [bos_id, bos_id]
    # Setting add_eos_token rebuilds transformers' post-processor; BOS must survive it.
    tok.add_eos_token = True
    try:
        assert tok("hi").input_ids[0] == bos_id and tok("hi").input_ids[-1] == eos_id
    finally:
        tok.add_eos_token = False
    assert tok("hi").input_ids[-1] != eos_id


@pytest.mark.parametrize(("path_fn", "bos_id"), [("llama3_path", 128000), ("mistral_v1_path", 1)])
def test_saved_directory_loads_with_bos(cache: Path, path_fn: str, bos_id: int) -> None:
    path = getattr(T, path_fn)(cache)
    assert path.parent == cache / "tokenizers" and (path / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(path))  # as TransformerLens loads it
    assert tok("hi").input_ids[0] == bos_id and tok("hi").input_ids.count(bos_id) == 1


# ------------------------------------------------------------------------------------ offsets


def _check_offsets(tok, texts: list[str], special_ids: set[int]) -> list[tuple[int, int, int, int]]:
    """Offsets are in bounds, non-empty, monotone and gap-free, and taking from each token only the
    characters past the previous token's end rebuilds the text. Returns the overlaps as
    (index of the earlier token, its offsets ..., offsets of the later token) for partial overlaps."""
    enc = tok(texts, return_offsets_mapping=True, add_special_tokens=False)
    partial = []
    for text, ids, offsets in zip(texts, enc.input_ids, enc.offset_mapping, strict=True):
        rebuilt, prev_s, prev_e = [], 0, 0
        for i, (tid, (s, e)) in enumerate(zip(ids, offsets, strict=True)):
            assert tid not in special_ids
            assert 0 <= s < e <= len(text) and text[s:e], (text, tid, s, e)
            assert s >= prev_s and e >= prev_e and s <= prev_e, (text, offsets)
            if s < prev_e and (s, e) != (prev_s, prev_e):
                partial.append((tok.convert_ids_to_tokens(ids[i - 1]), prev_s, prev_e, s, e))
            rebuilt.append(text[max(s, prev_e) : e])
            prev_s, prev_e = s, e
        assert "".join(rebuilt) == text, (text, offsets)
    # The special token added in front reports an empty span.
    enc = tok(texts[:50], return_offsets_mapping=True)
    assert all(
        ids[0] in special_ids and tuple(offs[0]) == (0, 0)
        for ids, offs in zip(enc.input_ids, enc.offset_mapping, strict=True)
    )
    return partial


def test_llama3_offsets(llama, texts: list[str]) -> None:
    # Partial overlaps come from tokens that end inside a multi-byte character.
    assert _check_offsets(llama, texts, {T.LLAMA3_BOS_ID})
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    enc = llama(texts, add_special_tokens=False, return_offsets_mapping=True)
    for text, ids, offsets in zip(texts, enc.input_ids, enc.offset_mapping, strict=True):
        pieces = [bytes(byte_decoder[c] for c in tok) for tok in llama.convert_ids_to_tokens(ids)]
        assert b"".join(pieces) == text.encode("utf-8")
        # A token's bytes lie inside the UTF-8 encoding of its offset span.
        for piece, (s, e) in zip(pieces, offsets, strict=True):
            assert piece in text[s:e].encode("utf-8"), (text, piece, s, e)
    assert [tuple(o) for o in llama("Hello world", return_offsets_mapping=True).offset_mapping] == [
        (0, 0),
        (0, 5),
        (5, 11),
    ]
    assert llama("👍", return_offsets_mapping=True).offset_mapping[1:] == [(0, 1)] * 3


def test_mistral_v1_offsets(mistral, texts: list[str]) -> None:
    # The only partial overlaps: the prepended "▁" standing alone at the start, charged to the first
    # character, which the next token covers again.
    partial = _check_offsets(mistral, texts, {T.MISTRAL_V1_BOS_ID})
    assert partial and all(prev == "▁" and prev_s == s == 0 for prev, prev_s, _, s, _ in partial)

    def pairs(text: str) -> list[tuple[str, tuple[int, int]]]:
        enc = mistral(text, return_offsets_mapping=True)
        return list(
            zip(mistral.convert_ids_to_tokens(enc.input_ids), map(tuple, enc.offset_mapping), strict=True)
        )[1:]

    # The prepended "▁" merged into the first word adds nothing; a space in the text is charged to
    # the token that carries its "▁".
    assert pairs("Hello world") == [("▁Hello", (0, 5)), ("▁world", (5, 11))]
    # Standing alone, the prepended "▁" reports the first character, which the next token covers too.
    assert pairs(" lead") == [("▁", (0, 1)), ("▁lead", (0, 5))]
    assert pairs("\nx") == [("▁", (0, 1)), ("<0x0A>", (0, 1)), ("x", (1, 2))]
    # Byte-fallback pieces of one character all report that whole character.
    assert pairs("a𝔘") == [("▁a", (0, 1))] + [(f"<0x{b:02X}>", (1, 2)) for b in "𝔘".encode()]


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


# ------------------------------------------------------------------------------------ cache


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XLENS_ALIGN_CACHE", raising=False)
    assert T.default_cache_dir() == Path.home() / ".cache" / "xlens_align"
    monkeypatch.setenv("XLENS_ALIGN_CACHE", str(tmp_path))
    assert T.default_cache_dir() == tmp_path
    path = T.mistral_v1_path()
    assert path == tmp_path / "tokenizers" / "mistral_v1"
    stamp = json.loads((path / "xlens_align_tokenizer.json").read_text())
    assert stamp["kind"] == "mistral_v1" and len(stamp["source_sha256"]) == 64
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    def fail(model_file: Path):
        raise AssertionError("rebuilt although the cache was valid")

    monkeypatch.setattr(T, "_MISTRAL_V1", dataclasses.replace(T._MISTRAL_V1, build=fail))
    assert T.mistral_v1()("hi").input_ids[0] == 1
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    monkeypatch.setenv("XLENS_ALIGN_CACHE", str(tmp_path))

    # A stale stamp or a broken tokenizer.json gets rebuilt in place.
    (path / "xlens_align_tokenizer.json").write_text(json.dumps({**stamp, "format": -1}))
    assert (
        T.mistral_v1_path() == path and json.loads((path / "xlens_align_tokenizer.json").read_text()) == stamp
    )
    (path / "tokenizer.json").write_text("{not json")
    assert T.mistral_v1()("hi").input_ids[:1] == [1]
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == ["mistral_v1"]  # no temp leftovers


def test_concurrent_builds_do_not_corrupt(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(T.mistral_v1_path(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == ["mistral_v1"]
    assert T.mistral_v1(tmp_path)("hi").input_ids[0] == 1


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "llama_models", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llama-models==0\.3\.0"):
        T.llama3_path(tmp_path)
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps mistral-common==1\.13\.1"):
        T.mistral_v1(tmp_path)
    monkeypatch.undo()
    gone = dataclasses.replace(T._MISTRAL_V1_SOURCE, resource="data/no-such-file.model")
    monkeypatch.setattr(T, "_MISTRAL_V1", dataclasses.replace(T._MISTRAL_V1, source=gone))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mistral-common==1\.13\.1"):
        T.mistral_v1_path(tmp_path)
    assert not (tmp_path / "tokenizers").exists()
