"""A generated knowledge world with exact fact checking, and a tiny base model pretrained on it."""

from kt_jax.world.checker import Checker, FactReport, Triple, evaluate_answers, kendall_tau, summarize
from kt_jax.world.generator import Entity, World, WorldConfig, generate_world
from kt_jax.world.render import Question, canonical_answer, corpus, splits, write_world

__all__ = [
    "Checker", "Entity", "FactReport", "Question", "Triple", "World", "WorldConfig", "canonical_answer", "corpus",
    "evaluate_answers", "generate_world", "kendall_tau", "splits", "summarize", "write_world",
]
