"""Validity checks: each passes on numbers that satisfy it and fails on a world or run built to break it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kt_jax.errors import DataError
from kt_jax.eval.statistics import paired_bootstrap
from kt_jax.world import WorldConfig, generate_world, splits
from kt_jax.world.render import description, fact_sentence, value_text
from kt_jax.world.validity import (
    check_determinism,
    check_learned,
    check_power,
    check_stored,
    cloze_items,
    cloze_probe,
    score_cloze,
)

TINY = WorldConfig(seed=0, num_people=6, num_orgs=3, num_places=3, num_artefacts=3, num_regions=2, num_rivers=2)


def _gold_completion(world, item) -> str:
    return fact_sentence(world, world.entities[item.entity_id], item.attribute, item.variant)[len(item.sentence_start):]


def test_cloze_items_cut_corpus_sentences_before_the_value():
    world = generate_world(TINY)
    items = cloze_items(world, world.test_ids)
    ent = world.entities[items[0].entity_id]
    assert {i.entity_id for i in items} == set(world.test_ids)
    (item,) = [i for i in items if i.entity_id == ent.id and i.attribute == "birthplace" and i.variant == 0]
    born = fact_sentence(world, ent, "birth_year", 0)  # "About X\n<birth year, variant 0> X was born in"
    assert ent.kind == "person" and item.prompt == f"About {ent.display}\n{born} {ent.display} was born in"
    for item in items:  # the probed sentence cut before its value; wordings that start with the value skipped
        sentence = fact_sentence(world, world.entities[item.entity_id], item.attribute, item.variant)
        value = value_text(world, world.entities[item.entity_id].facts[item.attribute])
        assert sentence.startswith(item.sentence_start) and item.prompt.endswith(item.sentence_start)
        assert not item.sentence_start.startswith("In ") and value not in item.sentence_start
    with pytest.raises(DataError, match="nobody"):
        cloze_items(world, ["nobody"])


def test_stored_passes_on_the_corpus_wording_and_fails_on_wrong_values():
    world = generate_world(TINY)
    items = cloze_items(world, world.test_ids)
    gold = [_gold_completion(world, i) + " And more." for i in items]
    recall, rows = score_cloze(world, items, gold)
    assert recall == 1.0 and check_stored(recall) == {"value": 1.0, "threshold": 0.9, "pass": True}
    # wrong years and numbers (a model that has not stored them)
    shifted = [c.replace("1", "3").replace("7", "2") for c in gold]
    recall_bad, _ = score_cloze(world, items, shifted)
    assert recall_bad < 0.9 and not check_stored(recall_bad)["pass"]
    assert [r["recalled"] for r in rows].count(True) == len(items)


@pytest.mark.slow
def test_stored_fails_for_a_model_pretrained_without_the_test_entities(tmp_path):
    import random

    from kt_jax.data.tokenizer import train_bpe_tokenizer
    from kt_jax.world.pretrain import LMBatches, PretrainConfig, build_model, encode_doc, train_lm

    world = generate_world(TINY)
    rng = random.Random(0)
    docs = [f"About {world.entities[e].display}\n" + description(world, world.entities[e], rng)
            for e in world.train_ids for _ in range(2)]  # a corpus without the test entities
    tok = train_bpe_tokenizer(docs, 300, tmp_path / "tok")
    cfg = PretrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         seq_len=128, batch_size=4, steps=8, warmup_steps=2, log_every=4)
    model = build_model(cfg, tok.vocab_size)
    model, losses = train_lm(model, LMBatches([encode_doc(tok, d) for d in docs], cfg), cfg, tmp_path / "run")
    assert len(losses) == 8
    recall, rows = cloze_probe(model, tok, world, world.test_ids[:2], max_new_tokens=6, variants=[1])
    assert len(rows) >= 8 and recall < 0.9
    assert not check_stored(recall)["pass"]


def test_learned():
    assert check_learned(0.55, 0.40) == {"value": 0.55, "threshold": [0.3, 0.85], "pass": True,
                                         "base_qa_completeness": 0.40}
    assert not check_learned(0.95, 0.40)["pass"]  # no room to move up
    assert not check_learned(0.20, 0.10)["pass"]  # extraction not learned
    # issue 16's world-tiny run: the base model answered 0.703 in the QA template, SFT 0.505 -> knowledge destroyed
    assert not check_learned(0.505, 0.703)["pass"]


def test_power_fails_on_a_small_world_and_on_noisy_differences():
    small = generate_world(TINY)
    n_small = len(splits(small)["test"])
    exact = {"mean": 0.05, "ci_low": 0.04, "ci_high": 0.06}
    assert n_small < 300 and not check_power(n_small, exact)["pass"]
    assert check_power(400, exact) == {"value": pytest.approx(0.01), "threshold": 0.03, "pass": True,
                                       "questions": 400, "min_questions": 300}
    rng = np.random.default_rng(0)  # 400 questions whose completeness differences spread widely (sd 0.5)
    base = rng.uniform(0, 1, 400)
    noisy = paired_bootstrap(np.clip(base + rng.normal(0, 0.5, 400), 0, 1), base, resamples=2000)
    check = check_power(400, noisy)
    assert check["value"] > 0.03 and not check["pass"]
    assert not check_power(400, {"mean": 0.0, "ci_low": math.nan, "ci_high": math.nan})["pass"]


def test_determinism():
    run = {"SFT": {"completeness": 0.5, "logicality": math.nan, "answers": 26}, "curve": [1.0, 0.5], "name": "a"}
    same = {"SFT": {"completeness": 0.5, "logicality": math.nan, "answers": 26}, "curve": [1.0, 0.5], "name": "a"}
    assert check_determinism(run, same) == {"value": 0.0, "threshold": 0.0, "pass": True}
    off = {**same, "curve": [1.0, 0.5 + 1e-9]}
    assert check_determinism(run, off)["value"] == pytest.approx(1e-9) and not check_determinism(run, off)["pass"]
    assert not check_determinism(run, {**same, "name": "b"})["pass"]
    assert check_determinism(run, {"SFT": same["SFT"]})["value"] == math.inf
