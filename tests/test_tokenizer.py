"""Tokenizer loading (SentencePiece, HF dir, `tokenizers` json) and training; continuation encoding."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from kt_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    encode_continuation,
    load_tokenizer,
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
)
from kt_jax.errors import ConfigError

CORPUS = Path(__file__).parent / "fixtures" / "corpus.txt"
TEXTS = ["Paris", " Paris", "\nThe answer", "東京 ü café", "  two spaces", "x\n\ny", "Ends with space "]


def corpus_lines(n: int = 600, seed: int = 0) -> list[str]:
    """The fixture corpus plus shuffled-word variations of it (deterministic)."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    words = " ".join(lines).split()
    rng = random.Random(seed)
    return lines + [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece_tokenizer(corpus_lines(), 400, out)
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(corpus_lines(), 500, out)
    return out


def test_sentencepiece_loads_from_file_and_dir(spm_dir: Path) -> None:
    a = load_tokenizer(spm_dir / "tokenizer.model")
    b = load_tokenizer(spm_dir)
    assert isinstance(a, SentencePieceTokenizer) and isinstance(b, Tokenizer)
    assert (a.bos_id, a.eos_id, a.pad_id, a.vocab_size) == (1, 2, 2, 400)
    assert (b.bos_id, b.eos_id) == (1, 2)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)


def test_sentencepiece_dummy_prefix_only_in_encode(spm_dir: Path) -> None:
    tok = load_tokenizer(spm_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    # encode: Llama-2 behaviour, the text gets a leading "▁"; continuation: it does not.
    assert tok.id_to_piece(tok.encode("Paris")[0]).startswith("▁")
    assert not tok.id_to_piece(tok.encode_continuation("Paris")[0]).startswith("▁")
    assert tok.id_to_piece(tok.encode_continuation(" Paris")[0]).startswith("▁")
    assert tok.id_to_piece(tok.encode_continuation("\nx")[0]) == "<0x0A>"
    for text in TEXTS:
        ids = tok.encode_continuation(text)
        assert tok.decode(tok.encode("Q:") + ids) == "Q:" + text
        assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id, *tok.encode("東京"), tok.eos_id]) == "東京"


def test_hf_json_of_a_sentencepiece_model_matches_it(spm_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(spm_dir)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    fast, spm = load_tokenizer(tmp_path), load_tokenizer(spm_dir)
    assert isinstance(fast, HFTokenizer)
    assert (fast.bos_id, fast.eos_id, fast.vocab_size) == (spm.bos_id, spm.eos_id, spm.vocab_size)
    for text in TEXTS:
        assert fast.encode_continuation(text) == spm.encode_continuation(text), text
        assert fast.decode(spm.encode_continuation(text)) == spm.decode(spm.encode_continuation(text))
        if not text.startswith(" "):  # transformers' Metaspace does not double a leading space; SentencePiece does
            assert fast.encode(text) == spm.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_trained_bpe_is_hf_loadable(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 500)
    for text in TEXTS:
        assert tok.encode(text) == tok.encode_continuation(text)  # byte-level: no prefix space added
        assert tok.decode(tok.encode(text)) == text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == [1, *tok.encode(text)]
    bare = load_tokenizer(bpe_dir / "tokenizer.json")
    assert bare.encode("café") == tok.encode("café") and bare.eos_id == 2


def test_bare_json_guesses_specials(bpe_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    (tmp_path / "bpe.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path / "bpe.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_encode_continuation_falls_back_to_encode() -> None:
    class Chars:
        bos_id, eos_id, pad_id, vocab_size = None, 0, 0, 256

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

        def decode(self, ids) -> str:
            return bytes(ids).decode()

    assert encode_continuation(Chars(), "ab") == [97, 98]


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"tokenizer\.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "t.json").write_text("{")
    with pytest.raises(ConfigError, match=r"t\.json"):
        load_tokenizer(tmp_path / "t.json")


@pytest.mark.skipif(not os.environ.get("KT_JAX_LLAMA2_SPM"), reason="KT_JAX_LLAMA2_SPM: a Llama-2 tokenizer.model")
def test_real_llama2_sentencepiece() -> None:
    tok = load_tokenizer(os.environ["KT_JAX_LLAMA2_SPM"])
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert [tok.id_to_piece(i) for i in tok.encode_continuation(" Paris\n")][-1] == "<0x0A>"
    for text in TEXTS:
        assert tok.decode(tok.encode("Q:\n") + tok.encode_continuation(text)) == "Q:\n" + text
