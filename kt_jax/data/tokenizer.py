"""Tokenizers without transformers: SentencePiece `.model` files, `tokenizers` JSON (HF dirs), byte-level BPE training.

Every tokenizer here has `encode` (no special tokens; a SentencePiece model adds its usual leading "▁" to the text,
exactly like HF `encode(text, add_special_tokens=False)`) and `encode_continuation` (the same text tokenized as
the continuation of earlier text: no dummy-prefix "▁" is added, so `encode(prompt) + encode_continuation(answer)`
decodes back to `prompt + answer` byte for byte). `templates.encode_pair` uses the second for the response.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kt_jax.config import read_json_file
from kt_jax.errors import ConfigError

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of kt-jax needs from a tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def encode_continuation(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a continuation (no dummy-prefix space); falls back to `encode` for other tokenizers."""
    fn = getattr(tok, "encode_continuation", None)
    return list(fn(text)) if fn is not None else list(tok.encode(text))


class SentencePieceTokenizer:
    """A SentencePiece model (e.g. Llama-2's `tokenizer.model`)."""

    def __init__(self, model_path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = Path(model_path)
        try:
            data = self.path.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ConfigError(f"{self.path}: not a SentencePiece model ({exc})") from exc
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = self._special(bos_token, self._sp.bos_id())
        eos = self._special(eos_token, self._sp.eos_id())
        if eos is None:
            raise ConfigError(f"{self.path}: the SentencePiece model defines no EOS token")
        self.eos_id = eos
        pad = self._special(pad_token, self._sp.pad_id())
        self.pad_id = eos if pad is None else pad

    def _special(self, name: str | None, default: int) -> int | None:
        if name is not None:
            idx = self._sp.piece_to_id(name)
            if idx == self._sp.unk_id() and name != self._sp.id_to_piece(idx):
                raise ConfigError(f"{self.path}: special token {name!r} is not in the vocabulary")
            return int(idx)
        return int(default) if default >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids with the usual leading dummy-prefix space, no BOS/EOS."""
        return list(self._sp.encode(text))

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` continuing earlier text: no dummy-prefix space is added."""
        return list(self._sp_cont.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS/EOS/PAD) are skipped."""
        return str(self._sp.decode([int(i) for i in ids]))

    def id_to_piece(self, idx: int) -> str:
        """The vocabulary piece of one id (for tests and debugging)."""
        return str(self._sp.id_to_piece(int(idx)))


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _strip_dummy_prefix(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a `tokenizers` JSON spec that adds no leading space/"▁" to the text (the vocabulary and merges
    are shared with `spec`, not copied: a deep copy of a 128K vocabulary takes seconds)."""
    spec = {**spec, "normalizer": copy.deepcopy(spec.get("normalizer")),
            "pre_tokenizer": copy.deepcopy(spec.get("pre_tokenizer"))}

    def fix(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "Prepend":
            return None
        if kind == "Metaspace":
            node["prepend_scheme"] = "never"
            node["add_prefix_space"] = False
        if kind == "ByteLevel":
            node["add_prefix_space"] = False
        if kind == "Sequence":
            key = "normalizers" if "normalizers" in node else "pretokenizers"
            node[key] = [m for m in (fix(n) for n in node.get(key, [])) if m is not None]
        return node

    spec["normalizer"] = fix(spec.get("normalizer"))
    spec["pre_tokenizer"] = fix(spec.get("pre_tokenizer"))
    return spec


class HFTokenizer:
    """A `tokenizers` JSON tokenizer (a HF directory's tokenizer.json, or a bare BPE json file)."""

    def __init__(self, json_path: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self.path = Path(json_path)
        try:
            spec = json.loads(self.path.read_text(encoding="utf-8"))
            self._tok = RawTokenizer.from_str(json.dumps(spec))
            self._tok_cont = RawTokenizer.from_str(json.dumps(_strip_dummy_prefix(spec)))
        except Exception as exc:
            raise ConfigError(f"{self.path}: not a `tokenizers` JSON file ({exc})") from exc
        config = config or {}
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._lookup(config, "bos_token", _BOS_NAMES)
        eos = self._lookup(config, "eos_token", _EOS_NAMES)
        if eos is None:
            raise ConfigError(f"{self.path}: no eos_token (set it in tokenizer_config.json)")
        self.eos_id = eos
        pad = self._lookup(config, "pad_token", _PAD_NAMES)
        self.pad_id = eos if pad is None else pad

    def _lookup(self, config: dict[str, Any], key: str, fallbacks: Sequence[str]) -> int | None:
        if key in config:
            name = _token_name(config[key])
            if name is None:
                return None
            idx = self._tok.token_to_id(name)
            if idx is None:
                raise ConfigError(f"{self.path}: {key} {name!r} is not in the vocabulary")
            return int(idx)
        for name in fallbacks:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return int(idx)
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens (HF `add_special_tokens=False`)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` continuing earlier text: no prefix space/"▁" is added."""
        return list(self._tok_cont.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens skipped."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def id_to_piece(self, idx: int) -> str:
        """The vocabulary token of one id (for tests and debugging)."""
        return str(self._tok.id_to_token(int(idx)))


def _dir_config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (path / name).is_file():
            cfg = read_json_file(path / name)
            config.update({k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token")})
    return config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a HF tokenizer directory, a SentencePiece `tokenizer.model`, or a `tokenizers` JSON file."""
    path = Path(path)
    if path.is_dir():
        config = _dir_config(path)
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json", config)
        if (path / "tokenizer.model").is_file():
            names = {k: _token_name(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
            return SentencePieceTokenizer(path / "tokenizer.model", **names)
        raise ConfigError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer path does not exist")
    if path.suffix == ".json":
        return HFTokenizer(path, _dir_config(path.parent) if path.name == "tokenizer.json" else None)
    return SentencePieceTokenizer(path)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on `texts` and save it as a HF-loadable directory (`<pad>`=0, `<s>`=1, `</s>`=2)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>"]
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # HF's default `add_special_tokens=True` then prepends BOS like a Llama tokenizer does.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", tok.token_to_id("<s>"))])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2) + "\n", encoding="utf-8")
    return load_tokenizer(out)


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a Llama-2-style SentencePiece BPE (byte fallback, dummy prefix, `<unk>`=0 `<s>`=1 `</s>`=2).

    Saved as `out_dir/tokenizer.model` plus a `tokenizer_config.json` that transformers' AutoTokenizer loads.
    """
    import io

    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return load_tokenizer(out)
