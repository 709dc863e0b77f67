"""The alpaca prompt bytes and prompt/response tokenization against hand-built references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kt_jax.data.templates import alpaca_prompt, encode_pair, encode_prompt, prompt_text, question_text
from kt_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer, train_sentencepiece_tokenizer
from kt_jax.errors import ConfigError
from tests.test_tokenizer import corpus_lines

ANSWERS = ["Paris.", " Paris, with a leading space.", "\nFirst line\nsecond line\n", "Zürich and 東京 — naïve café.",
           "  two spaces", "1. Fever\n2. Cough"]
QUESTIONS = [("What is the capital of France?", ""), ("Summarise the text.", "Insulin is a hormone.\nIt is made.")]


def test_alpaca_prompt_bytes_llamafactory_053() -> None:
    # LLaMA-Factory 0.5.3: system string + user slot with no separator between them.
    assert alpaca_prompt("What is X?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "### Instruction:\nWhat is X?\n\n### Response:\n")
    assert alpaca_prompt("Summarise.", "Some text.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "### Instruction:\nSummarise.\nSome text.\n\n### Response:\n")


def test_alpaca_prompt_bytes_llamafactory_07() -> None:
    assert alpaca_prompt("What is X?", style="llamafactory-0.7") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is X?\n\n### Response:\n")
    with pytest.raises(ConfigError, match="'alpaca'"):
        alpaca_prompt("q", style="alpaca")


def test_one_question_text_under_every_prompt() -> None:
    assert question_text("Summarise.") == question_text("Summarise.", "") == "Summarise."
    assert question_text("Summarise.", "Some text.") == "Summarise.\nSome text."
    assert question_text("Summarise.", " ") == "Summarise.\n "  # LLaMA-Factory: any non-empty input is joined
    for instruction, inp in [*QUESTIONS, ("Q?", " ")]:
        query = question_text(instruction, inp)
        assert alpaca_prompt(instruction, inp) == alpaca_prompt(query)  # joined before or inside: the same bytes
        assert prompt_text(instruction, inp) == alpaca_prompt(instruction, inp)
        assert prompt_text(query, template="raw") == prompt_text(instruction, inp, template="raw") == query
        assert prompt_text(query, style="llamafactory-0.7") == alpaca_prompt(instruction, inp, "llamafactory-0.7")
    with pytest.raises(ConfigError, match="template='chatml'"):
        prompt_text("q", template="chatml")


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory: pytest.TempPathFactory):
    return train_sentencepiece_tokenizer(corpus_lines(), 400, tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(corpus_lines(), 500, out)
    return out


def _check_sentencepiece(tok, raw) -> None:
    """Reference: BOS + SentencePiece on the whole text "prompt + answer" (the prompt ends in a byte-fallback
    "\\n", so nothing can merge across the boundary) + EOS; the split point is the prompt's own length."""
    for instruction, inp in QUESTIONS:
        prompt = alpaca_prompt(instruction, inp)
        n_prompt = 1 + len(raw.encode(prompt))
        for answer in ANSWERS:
            pair = encode_pair(tok, prompt, answer, max_len=4096)
            reference = [raw.bos_id(), *raw.encode(prompt + answer), raw.eos_id()]
            assert pair.prompt_ids + pair.response_ids == reference, answer
            assert len(pair.prompt_ids) == n_prompt and not pair.truncated
            assert tok.decode(pair.prompt_ids + pair.response_ids) == prompt + answer
            pieces = [raw.id_to_piece(i) for i in pair.response_ids]
            assert pieces[-1] == "</s>" and pieces.count("</s>") == 1
            assert pieces[0].startswith("▁") == answer.startswith(" "), pieces  # no dummy-prefix space added
            if answer.startswith("\n"):
                assert pieces[0] == "<0x0A>"


def test_encode_pair_sentencepiece_matches_reference(spm_tok, tmp_path_factory) -> None:
    import sentencepiece as spm

    raw = spm.SentencePieceProcessor(model_file=str(spm_tok.path))
    _check_sentencepiece(spm_tok, raw)


@pytest.mark.skipif(not os.environ.get("KT_JAX_LLAMA2_SPM"), reason="KT_JAX_LLAMA2_SPM: a Llama-2 tokenizer.model")
def test_encode_pair_real_llama2_sentencepiece() -> None:
    import sentencepiece as spm

    path = os.environ["KT_JAX_LLAMA2_SPM"]
    _check_sentencepiece(load_tokenizer(path), spm.SentencePieceProcessor(model_file=path))


def test_encode_pair_byte_level_bpe_matches_reference(bpe_dir: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer

    tok = load_tokenizer(bpe_dir)
    raw = RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    for instruction, inp in QUESTIONS:
        prompt = alpaca_prompt(instruction, inp)
        for answer in ANSWERS:
            pair = encode_pair(tok, prompt, answer, max_len=4096)
            assert pair.prompt_ids == [bos, *raw.encode(prompt, add_special_tokens=False).ids]
            assert pair.response_ids == [*raw.encode(answer, add_special_tokens=False).ids, eos]
            assert tok.decode(pair.prompt_ids + pair.response_ids) == prompt + answer
            assert (pair.prompt_ids + pair.response_ids).count(bos) == 1
            # hand check of the boundary: the answer's first byte-level token carries its own leading space
            first = raw.id_to_token(pair.response_ids[0])
            assert first.startswith("Ġ") == answer.startswith(" ") and first.startswith("Ċ") == answer.startswith("\n")


def test_truncation_keeps_prompt_cuts_response(spm_tok) -> None:
    prompt = alpaca_prompt("What is the capital of France?")
    full = encode_pair(spm_tok, prompt, "The capital of France is Paris.", max_len=4096)
    n_p, n_r = len(full.prompt_ids), len(full.response_ids)
    cut = encode_pair(spm_tok, prompt, "The capital of France is Paris.", max_len=n_p + n_r - 1)
    assert cut.truncated and cut.prompt_ids == full.prompt_ids
    assert cut.response_ids == full.response_ids[:-1] and spm_tok.eos_id not in cut.response_ids
    exact = encode_pair(spm_tok, prompt, "The capital of France is Paris.", max_len=n_p + n_r)
    assert not exact.truncated and exact.length == n_p + n_r
    none_left = encode_pair(spm_tok, prompt, "Paris", max_len=n_p - 3)
    assert none_left.truncated and none_left.response_ids == [] and none_left.prompt_ids == full.prompt_ids


def test_bos_eos_options(spm_tok) -> None:
    p = encode_pair(spm_tok, "Q:\n", "A", max_len=64, add_eos=False, add_bos=False)
    assert p.prompt_ids == spm_tok.encode("Q:\n") and p.response_ids == spm_tok.encode_continuation("A")

    class NoBos:
        bos_id, eos_id, pad_id, vocab_size = None, 0, 0, 256

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

        def decode(self, ids) -> str:
            return bytes(ids).decode()

    q = encode_pair(NoBos(), "Q", "ü", max_len=8)
    assert q.prompt_ids == [81] and q.response_ids == [195, 188, 0]


def test_encode_prompt_is_the_pair_prompt_with_or_without_bos(spm_tok) -> None:
    prompt = alpaca_prompt(*QUESTIONS[1])
    with_bos, without = encode_prompt(spm_tok, prompt), encode_prompt(spm_tok, prompt, add_bos=False)
    assert with_bos == [spm_tok.bos_id, *spm_tok.encode(prompt)] and without == with_bos[1:]
    for add_bos, ids in ((True, with_bos), (False, without)):
        assert encode_pair(spm_tok, prompt, "Paris.", max_len=4096, add_bos=add_bos).prompt_ids == ids
