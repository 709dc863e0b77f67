"""Rotary position embeddings as HF Llama computes them (default, linear and llama3 frequency scaling)."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from kt_jax.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2] (float32), with the checkpoint's scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise CheckpointError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rotary_cos_sin(positions_BxT: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, head_dim] (float32) for integer positions [B, T]."""
    freqs_BxTxK = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BxTxD = jnp.concatenate([freqs_BxTxK, freqs_BxTxK], axis=-1)
    return jnp.cos(emb_BxTxD), jnp.sin(emb_BxTxD)


def apply_rotary(x_BxTxNxD: jnp.ndarray, cos_BxTxD: jnp.ndarray, sin_BxTxD: jnp.ndarray) -> jnp.ndarray:
    """Rotate query/key heads (HF's rotate_half layout: first and second halves form the pairs)."""
    half = x_BxTxNxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxD[..., half:], x_BxTxNxD[..., :half]], axis=-1)
    cos = cos_BxTxD[:, :, None, :].astype(x_BxTxNxD.dtype)
    sin = sin_BxTxD[:, :, None, :].astype(x_BxTxNxD.dtype)
    return x_BxTxNxD * cos + rotated * sin
