"""Flax NNX Llama and its HF interop."""

from kt_jax.model.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
