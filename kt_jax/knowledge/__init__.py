"""Knowledge construction: LLM backends (offline, Anthropic), the on-disk call cache, KA and KC set builders."""

from kt_jax.knowledge.backend import CachedBackend, KnowledgeBackend, Outcome, Rejected, call_many, map_outcomes
from kt_jax.knowledge.registry import BACKENDS, backend_options, make_backend

__all__ = ["BACKENDS", "CachedBackend", "KnowledgeBackend", "Outcome", "Rejected", "backend_options", "call_many",
           "make_backend", "map_outcomes"]
