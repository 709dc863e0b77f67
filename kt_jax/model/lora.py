"""LoRA by model surgery: named `Linear` projections become `LoRALinear` (frozen base kernel + `nnx.LoRAParam` A/B).

The original KnowTuning setup: q_proj and v_proj, rank 8, alpha 16, dropout 0. The base kernel keeps its path
(`.../q_proj/kernel`), so HF loading, sharding and export are unchanged; A [in, r] and B [r, out] carry logical
axes ('embed', 'lora_rank') / ('lora_rank', <the base output axis>). B starts at zero, so a fresh adapter leaves
the model's outputs unchanged. `merge_lora` folds W + (alpha / r)·A·B back into plain `Linear`s for export;
`lora_disabled(model)` runs the base model with every adapter off (the DPO reference). `kt_jax.model.peft` saves
and loads the adapters in PEFT's format (a PEFT adapter as the starting point: `apply_lora` with its config, then
`peft.load_adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kt_jax.errors import ConfigError
from kt_jax.model.llama import Linear, Llama
from kt_jax.ops.matmul import matmul

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters and their shape (defaults: the original's q_proj/v_proj, r=8, alpha=16)."""

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        bad = sorted(set(self.targets) - set(ATTN_TARGETS + MLP_TARGETS))
        if bad or not self.targets:
            raise ConfigError(f"lora.targets: unknown projection(s) {bad}; choose from {ATTN_TARGETS + MLP_TARGETS}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.dropout != 0.0:
            raise ConfigError("lora.dropout: only 0.0 is supported (the original uses 0)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Module):
    """y = x @ W + scale · (x @ A) @ B; W is the frozen base `nnx.Param`, A and B are `nnx.LoRAParam`s."""

    def __init__(self, base: Linear, rank: int, alpha: float, rngs: nnx.Rngs):
        kernel = base.kernel.get_value()
        d_in, d_out = kernel.shape
        axes = tuple(base.kernel.get_metadata().get("logical_axes"))
        self.kernel = base.kernel
        self.dtype = base.dtype
        self.explicit_backward = base.explicit_backward
        self.scale = alpha / rank
        self.enabled = True
        bound = 1.0 / float(d_in) ** 0.5  # kaiming-uniform(a=sqrt(5)) as peft initialises A
        a = jax.random.uniform(rngs.params(), (d_in, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a.astype(kernel.dtype), logical_axes=(axes[0], "lora_rank"))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), kernel.dtype), logical_axes=("lora_rank", axes[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        dot = lambda a, w: matmul(a, w.get_value().astype(self.dtype), explicit_backward=self.explicit_backward)
        y = dot(x, self.kernel)
        if not self.enabled:
            return y
        return y + self.scale * dot(dot(x, self.lora_a), self.lora_b)

    def merged_kernel(self) -> jax.Array:
        """W + scale · A @ B in float32, cast to the base kernel's dtype."""
        w = self.kernel.get_value()
        delta = self.lora_a.get_value().astype(jnp.float32) @ self.lora_b.get_value().astype(jnp.float32)
        return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)


def _owners(model: Llama, targets: tuple[str, ...]) -> Iterator[tuple[nnx.Module, str]]:
    for block in model.layers:
        for name in targets:
            yield (block.self_attn if name in ATTN_TARGETS else block.mlp), name


def apply_lora(model: Llama, cfg: LoRAConfig, seed: int = 0) -> Llama:
    """Replace the targeted projections of `model` (in place) by LoRALinear; returns the model."""
    cfg.validate()
    rngs = nnx.Rngs(params=seed)
    for owner, name in _owners(model, cfg.targets):
        base = getattr(owner, name)
        if isinstance(base, LoRALinear):
            raise ConfigError(f"{name} already has a LoRA adapter")
        lora = LoRALinear(base, cfg.rank, cfg.alpha, rngs)
        kernel = base.kernel.get_value()
        if isinstance(kernel, jax.Array) and hasattr(kernel, "sharding") and hasattr(kernel.sharding, "mesh"):
            from kt_jax.sharding import logical_sharding

            for var in (lora.lora_a, lora.lora_b):
                axes = var.get_metadata()["logical_axes"]
                var.set_value(jax.device_put(var.get_value(), logical_sharding(
                    axes, var.get_value().shape, kernel.sharding.mesh, what=f"{name}/lora")))
        setattr(owner, name, lora)
    return model


def lora_modules(model: nnx.Module) -> list[LoRALinear]:
    """Every LoRALinear in `model`."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]


def has_lora(model: nnx.Module) -> bool:
    """Whether `model` carries any adapter."""
    return bool(lora_modules(model))


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Run `model` as its base (every adapter off) inside the block; jit/split sees the flag statically."""
    mods = lora_modules(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(mods, before, strict=True):
            m.enabled = flag


def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its base kernel (in place), leaving plain `Linear`s; returns the model."""
    for block in model.layers:
        for owner, names in ((block.self_attn, ATTN_TARGETS), (block.mlp, MLP_TARGETS)):
            for name in names:
                mod = getattr(owner, name)
                if isinstance(mod, LoRALinear):
                    merged = mod.merged_kernel() if mod.enabled else mod.kernel.get_value()
                    axes = tuple(mod.kernel.get_metadata().get("logical_axes"))
                    lin = nnx.eval_shape(lambda m=merged, a=axes: Linear(*m.shape, a, model.config, nnx.Rngs(0)))
                    lin.kernel = nnx.Param(merged, logical_axes=axes)
                    setattr(owner, name, lin)
    return model


def trainable_filter(lora: bool) -> Any:
    """The NNX filter of trained variables: adapters only under LoRA, else every parameter."""
    return nnx.LoRAParam if lora else nnx.Param


def frozen_filter(lora: bool) -> Any:
    """The NNX filter of parameters that stay fixed (the base under LoRA; nothing otherwise)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)) if lora else nnx.Nothing
