"""Train state: the model split into trained parameters (a pure dict) and frozen ones, plus optimizer state.

Under LoRA only the `nnx.LoRAParam` adapters are trained (and hold optimizer state); otherwise every parameter.
Trained parameters travel as a plain nested dict (what orbax saves); `TrainState.model(params)` rebuilds the
NNX model from it (also inside jit/grad).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kt_jax.model.lora import has_lora, trainable_filter
from kt_jax.sharding import state_shardings


@dataclasses.dataclass
class TrainState:
    """graphdef + template (static), trained params (pure dict), frozen state, optimizer state, step."""

    graphdef: Any
    template: nnx.State
    params: dict[str, Any]
    frozen: nnx.State
    opt_state: Any
    step: int
    lora: bool
    param_shardings: Any = None
    opt_shardings: Any = None

    def model(self, params: dict[str, Any] | None = None) -> nnx.Module:
        """The NNX model with `params` (default: the current ones) merged onto the frozen state."""
        return merge_params(self.graphdef, self.template, self.params if params is None else params, self.frozen)

    def num_trainable(self) -> int:
        """How many scalars are trained."""
        return int(sum(x.size for x in jax.tree.leaves(self.params)))


def merge_params(graphdef: Any, template: nnx.State, params: dict[str, Any], frozen: nnx.State) -> nnx.Module:
    """Rebuild the model from a pure-dict of trained parameters (jit/grad safe: the template is copied)."""
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, frozen)


def _replicated_like(mesh: Mesh | None) -> Any:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def create_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """Split `model` (LoRA detected from its modules) and initialise the optimizer on the trained parameters."""
    lora = has_lora(model)
    graphdef, trained, frozen = nnx.split(model, trainable_filter(lora), ...)
    params = nnx.to_pure_dict(trained)
    param_sh = opt_sh = None
    if mesh is not None:
        param_sh = nnx.to_pure_dict(state_shardings(trained, mesh))
        opt_sh = optimizer_shardings(tx, params, param_sh, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    else:  # commit everything to one device so step outputs match inputs (no recompile on the second step)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, frozen = jax.device_put(params, dev), jax.device_put(frozen, dev)
        opt_state = jax.device_put(tx.init(params), dev)
    return TrainState(graphdef, trained, params, frozen, opt_state, 0, lora, param_sh, opt_sh)


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of tx's state: per-parameter buffers follow their parameter, scalars (counts) are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = _replicated_like(mesh)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: rep)
