"""`matmul(x, w)`: x @ w whose backward pass may be written out instead of left to autodiff (arrays only).

Why (docs/DESIGN.md, "Speed on CPU"): autodiff's weight gradient of x [..., D] @ w [D, O] is `dot_general(g, x)`
followed by a transpose, which XLA:CPU turns into a plain dot over a transposed copy of the output gradient g: a
copy of the larger operand (for the LM head, g is [tokens, vocab]) and a dot outside the YNNPACK fusions every other
dot gets. Written out as `dot_general(x, g)` the weight gradient transposes x and runs as a YNNPACK GEMM. Same
products and dtypes as autodiff (only the order of a sum may differ); only a needed cotangent is computed (a frozen
kernel gets none, LoRA's base pays nothing). Measured on 2 CPU cores: the 42M SFT step 3.2 -> 2.7 s, the world
model's 0.43 -> 0.34 s. TPU and GPU compilers choose their own layouts, so `backward_dots="auto"` writes the backward
out for the CPU backend alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

BACKWARD_DOTS = ("auto", "explicit", "autodiff")


def explicit_backward_for(backward_dots: str) -> bool:
    """Whether `backward_dots` (auto | explicit | autodiff) asks for the written-out backward on this backend."""
    if backward_dots not in BACKWARD_DOTS:
        raise ValueError(f"backward_dots={backward_dots!r}; choose one of {', '.join(BACKWARD_DOTS)}")
    return backward_dots == "explicit" or (backward_dots == "auto" and jax.default_backend() == "cpu")


def matmul(x: jax.Array, w: jax.Array, *, explicit_backward: bool = False, out_dtype: Any = None) -> jax.Array:
    """`jnp.dot(x, w, preferred_element_type=out_dtype)` for x [..., D] and w [D, O]."""
    if not explicit_backward:
        return _dot(x, w, out_dtype)
    return _explicit_matmul(x, w, None if out_dtype is None else jnp.dtype(out_dtype))


def _dot(x: jax.Array, w: jax.Array, out_dtype: Any) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needed:
    """Which cotangents the backward must produce (static: it shapes the backward's program)."""

    x: bool
    w: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _explicit_matmul(x: jax.Array, w: jax.Array, out_dtype: Any) -> jax.Array:
    return _dot(x, w, out_dtype)


def _forward(x: Any, w: Any, out_dtype: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, _Needed]]:
    return _dot(x.value, w.value, out_dtype), (x.value, w.value, _Needed(x.perturbed, w.perturbed))


def _backward(out_dtype: Any, res: tuple[jax.Array, jax.Array, _Needed], g: jax.Array
              ) -> tuple[jax.Array | None, jax.Array | None]:
    x, w, needed = res
    if isinstance(g, SymbolicZero):
        return None, None
    dx = dw = None
    if needed.x:  # g [..., O] . w [D, O] over O, as autodiff
        dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)
        dx = dx.astype(x.dtype)
    if needed.w:  # x [..., D] . g [..., O] over the leading axes: x first, so no transpose of g follows
        lead = tuple(range(x.ndim - 1))
        dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=out_dtype).astype(w.dtype)
    return dx, dw


_explicit_matmul.defvjp(_forward, _backward, symbolic_zeros=True)
