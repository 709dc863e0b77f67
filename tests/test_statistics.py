"""Paired bootstrap CIs against cases with known answers; seed aggregation; the forest plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kt_jax.errors import DataError
from kt_jax.eval.statistics import (
    WORLD_METRICS,
    aggregate_seeds,
    forest_plot,
    paired_bootstrap,
    paired_bootstrap_ratio,
    world_differences,
)
from kt_jax.world import WorldConfig, canonical_answer, generate_world, splits
from kt_jax.world.checker import evaluate_answers, per_question


def test_constant_differences_give_a_zero_width_interval():
    base = np.random.default_rng(0).uniform(0, 1, 50)
    out = paired_bootstrap(base + 0.25, base)
    assert out["mean"] == pytest.approx(0.25, abs=1e-12)
    assert out["ci_low"] == pytest.approx(0.25, abs=1e-12) and out["ci_high"] == pytest.approx(0.25, abs=1e-12)


def test_normal_differences_have_the_textbook_half_width():
    rng = np.random.default_rng(1)
    n, sigma = 1000, 0.2
    base = rng.normal(0.5, 3.0, n)  # large per-question spread shared by both systems: pairing must cancel it
    system = base + rng.normal(0.1, sigma, n)
    out = paired_bootstrap(system, base, seed=3)
    half = (out["ci_high"] - out["ci_low"]) / 2
    assert half == pytest.approx(1.96 * sigma / math.sqrt(n), rel=0.10)
    assert out["ci_low"] < 0.1 < out["ci_high"] and out["mean"] == pytest.approx((system - base).mean())
    # seeded: the same call gives the same interval, another seed a slightly different one
    assert paired_bootstrap(system, base, seed=3) == out and paired_bootstrap(system, base, seed=4) != out
    wide = paired_bootstrap(system, base, level=0.99)
    assert wide["ci_low"] < out["ci_low"] and wide["ci_high"] > out["ci_high"]


def test_undefined_values_are_left_out_of_each_mean():
    system = np.array([1.0, np.nan, 0.5, 0.0])
    base = np.array([0.0, 0.5, np.nan, 0.5])
    out = paired_bootstrap(system, base, resamples=2000)
    assert out["mean"] == pytest.approx((1.0 + 0.5 + 0.0) / 3 - (0.0 + 0.5 + 0.5) / 3)
    assert out["ci_low"] <= out["mean"] <= out["ci_high"]


def test_ratio_of_sums():
    out = paired_bootstrap_ratio([1, 1, 1, 1], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4])
    assert out["mean"] == pytest.approx(0.5 - 10 / 16)
    same = paired_bootstrap_ratio([1, 2, 3], [3, 4, 5], [1, 2, 3], [3, 4, 5])
    assert (same["mean"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)


def test_bad_input_is_named():
    with pytest.raises(DataError, match="equal-length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="level"):
        paired_bootstrap([1.0, 2.0], [1.0, 0.0], level=95)


def test_world_differences_reproduce_the_summaries():
    world = generate_world(WorldConfig(seed=0))
    qs = splits(world)["test"]
    gold = [canonical_answer(world, world.entities[q.entity_id], q.attributes) for q in qs]
    # a worse system: drops the last sentence of every answer, states a wrong year in the first one
    worse = [" ".join(a.split(". ")[:-1]).replace("1", "2", 1) + "." if ". " in a else a for a in gold]
    s_gold, r_gold = evaluate_answers(world, qs, gold)
    s_worse, r_worse = evaluate_answers(world, qs, worse)
    rows_gold, rows_worse = per_question(r_gold), per_question(r_worse)
    assert np.mean([r["completeness"] for r in rows_worse]) == pytest.approx(s_worse["completeness"])
    diff = world_differences(rows_worse, rows_gold, resamples=500)
    assert set(diff) == set(WORLD_METRICS)
    for name, (_, _, key) in WORLD_METRICS.items():
        assert diff[name]["mean"] == pytest.approx(s_worse[key] - s_gold[key], abs=1e-12), name
        assert diff[name]["ci_low"] <= diff[name]["ci_high"]
    assert diff["completeness"]["ci_high"] < 0 and diff["wrong_per_answer"]["ci_low"] > 0
    with pytest.raises(DataError, match="same questions"):
        world_differences(rows_worse, rows_gold[::-1])


def test_aggregate_seeds():
    out = aggregate_seeds({0: {"completeness": 0.5, "wrong": 1.0}, 1: {"completeness": 0.6, "wrong": 2.0},
                           2: {"completeness": 0.7, "wrong": 3.0}})
    assert out["completeness"]["mean"] == pytest.approx(0.6) and out["completeness"]["std"] == pytest.approx(0.1)
    assert out["wrong"]["per_seed"] == {0: 1.0, 1: 2.0, 2: 3.0} and out["wrong"]["std"] == pytest.approx(1.0)
    assert aggregate_seeds({0: {"x": 1.0}})["x"]["std"] is None
    with pytest.raises(DataError, match="missing"):
        aggregate_seeds({0: {"x": 1.0}, 1: {"y": 1.0}})
    nested = aggregate_seeds({s: {"KnowTuning": {"completeness": {"mean": 0.1 * s, "ci_low": 0.0, "ci_high": 1.0}}}
                              for s in (1, 2, 3)})
    assert nested["KnowTuning"]["completeness"]["mean"]["mean"] == pytest.approx(0.2)
    assert nested["KnowTuning"]["completeness"]["ci_low"] == {"mean": 0.0, "std": 0.0, "per_seed": {1: 0.0, 2: 0.0,
                                                                                                  3: 0.0}}
    with pytest.raises(DataError, match="KnowTuning/name"):
        aggregate_seeds({0: {"KnowTuning": {"name": "a"}}, 1: {"KnowTuning": {"name": "b"}}})


def test_forest_plot_writes_a_png(tmp_path):
    import matplotlib.image

    diffs = {"KnowTuning": {"completeness": {"mean": 0.02, "ci_low": -0.01, "ci_high": 0.05},
                            "factuality": {"mean": -0.01, "ci_low": -0.03, "ci_high": 0.0}},
             "KA-SFT": {"completeness": {"mean": 0.01, "ci_low": 0.0, "ci_high": 0.03},
                        "factuality": {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}}}
    path = forest_plot(diffs, tmp_path / "plots" / "forest.png", title="seed 0")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[1] > img.shape[0] > 100  # two panels side by side
    with pytest.raises(DataError):
        forest_plot({}, tmp_path / "empty.png")


def test_resampling_whole_entities_widens_the_interval_by_the_entity_effect():
    rng = np.random.default_rng(5)
    entities, per = 200, 10
    labels = np.repeat(np.arange(entities), per)
    effect = rng.normal(0.0, 0.5, entities)  # the system's gain varies by entity, shared by its questions
    base = rng.uniform(0, 1, entities * per)
    system = base + 0.1 + effect[labels] + rng.normal(0.0, 0.05, entities * per)
    plain = paired_bootstrap(system, base, seed=2)
    grouped = paired_bootstrap(system, base, seed=2, clusters=[f"e{i}" for i in labels])
    assert grouped["mean"] == pytest.approx(plain["mean"], abs=1e-12)
    # entity means have sd ~ sqrt(0.5^2 + 0.05^2 / 10): the textbook half-width over 200 entities
    half = (grouped["ci_high"] - grouped["ci_low"]) / 2
    assert half == pytest.approx(1.96 * math.sqrt(0.25 + 0.0025 / per) / math.sqrt(entities), rel=0.12)
    assert half > 2.5 * (plain["ci_high"] - plain["ci_low"]) / 2
    # one question per cluster is the plain bootstrap (same width up to resampling noise)
    single = paired_bootstrap(system, base, seed=2, clusters=list(range(entities * per)))
    assert (single["ci_high"] - single["ci_low"]) == pytest.approx(plain["ci_high"] - plain["ci_low"], rel=0.1)
    with pytest.raises(DataError, match="cluster labels"):
        paired_bootstrap(system, base, clusters=[0, 1])
