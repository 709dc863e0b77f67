"""kt-jax: KnowTuning (knowledge-aware fine-tuning) in JAX/Flax."""

from kt_jax.errors import KtJaxError

__version__ = "0.1.0"
__all__ = ["KtJaxError", "__version__"]
