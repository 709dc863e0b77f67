"""Knowledge construction: LLM backends (offline, Anthropic), the on-disk call cache, KA and KC set builders."""

from kt_jax.knowledge.backend import (
    CachedBackend,
    KnowledgeBackend,
    Outcome,
    Rejected,
    call_many,
    make_backend,
    map_outcomes,
)

__all__ = ["CachedBackend", "KnowledgeBackend", "Outcome", "Rejected", "call_many", "make_backend", "map_outcomes"]
