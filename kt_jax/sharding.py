"""Device mesh (data, fsdp, tensor), the ONE logical-axis rules table, host<->device transfer, dispatch throttle."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kt_jax.errors import ShardingError

log = logging.getLogger(__name__)
T = TypeVar("T")

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None

# Logical axis name -> mesh axis (or axes, or None = replicated). Parameters and activations name their
# dimensions logically; changing the parallelism is changing the mesh shape, never the model.
DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # q projection output (num_heads * head_dim), o projection input
    "kv_heads": "tensor",  # k/v projection output (num_kv_heads * head_dim)
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    "layers": None,
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical-to-mesh axis rules; `spec()` checks names and that no mesh axis is used twice."""

    rules: tuple[tuple[str, MeshAxes], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def from_dict(cls, rules: dict[str, MeshAxes] | None = None) -> ShardingRules:
        merged = dict(DEFAULT_RULES)
        merged.update(rules or {})
        for name, axes in merged.items():
            for axis in _as_tuple(axes):
                if axis not in MESH_AXES:
                    raise ShardingError(f"rule {name!r} maps to unknown mesh axis {axis!r}; mesh axes: {MESH_AXES}")
        return cls(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in merged.items()))

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        table = dict(self.rules)
        if logical not in table:
            raise ShardingError(f"unknown logical axis name {logical!r}; known: {sorted(table)}")
        return table[logical]

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for a tensor whose dimensions carry these logical names."""
        parts = [self.mesh_axes(name) for name in logical_axes]
        used: dict[str, str | None] = {}
        for name, axes in zip(logical_axes, parts, strict=True):
            for axis in _as_tuple(axes):
                if axis in used:
                    raise ShardingError(
                        f"mesh axis {axis!r} used twice in {tuple(logical_axes)} (by {used[axis]!r} and {name!r})"
                    )
                used[axis] = name
        return PartitionSpec(*parts)


RULES = ShardingRules()  # the one table (no config sets another yet; the model's ShardContext can carry one)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes as a config section (`mesh: {data, fsdp, tensor}`); one may be -1: the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The Mesh these sizes describe over `devices` (default: all)."""
        return make_mesh(self.data, self.fsdp, self.tensor, devices=devices)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A Mesh over axes (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError("at most one mesh axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive (or -1): {dict(zip(MESH_AXES, sizes, strict=True))}")
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {total} devices, {len(devices)} are available"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices)
    except Exception:  # non-TPU topologies that mesh_utils cannot lay out: plain order is fine there
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:  # Auto axes: GSPMD propagation (Explicit breaks embedding gathers)
        return Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))
    return Mesh(grid, MESH_AXES)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str) -> PartitionSpec:
    """Drop sharding on dimensions the mesh axes do not divide evenly (they stay replicated)."""
    parts = list(spec) + [None] * (len(shape) - len(spec))
    for i, axes in enumerate(parts):
        n = int(np.prod([mesh.shape[a] for a in _as_tuple(axes)])) if axes else 1
        if n > 1 and shape[i] % n:
            log.warning("%s: dim %d (size %d) not divisible by %s=%d; replicated", what, i, shape[i], axes, n)
            parts[i] = None
    return PartitionSpec(*parts)


def logical_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: ShardingRules | None = None,
    what: str = "tensor",
) -> NamedSharding:
    """NamedSharding for a tensor of `shape` whose dimensions carry `logical_axes`."""
    rules = rules or RULES
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}")
    return NamedSharding(mesh, _fit_spec(rules.spec(logical_axes), shape, mesh, what))


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names stored on an NNX variable, or an error naming it."""
    axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
    if axes is None:
        axes = getattr(var, "logical_axes", None)
    if axes is None:
        raise ShardingError(f"variable of shape {getattr(var.get_value(), 'shape', '?')} has no logical_axes metadata")
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """A pytree matching `state` whose leaves are the NamedShardings the rules give each variable."""

    def one(path: tuple[Any, ...], var: nnx.Variable) -> NamedSharding:
        name = "/".join(str(p) for p in path)
        return logical_sharding(variable_axes(var), var.get_value().shape, mesh, what=name)

    return _map_state(one, state)


def _map_state(fn: Any, state: nnx.State) -> Any:
    flat = dict(nnx.to_flat_state(state))
    return nnx.from_flat_state({path: fn(path, var) for path, var in flat.items()})


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Sharding for an array whose axis `batch_dim` is the batch: split over the 'batch' rule's axes."""
    parts: list[MeshAxes] = [None] * ndim
    parts[batch_dim] = RULES.mesh_axes("batch")
    return NamedSharding(mesh, PartitionSpec(*parts))


def batch_axis_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split on this mesh (global batch sizes must be multiples)."""
    return int(np.prod([mesh.shape[a] for a in _as_tuple(RULES.mesh_axes("batch"))]))


def process_max(value: int) -> int:
    """The largest `value` over all processes (a collective when there are several)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int64))))


def to_device(tree: T, mesh: Mesh | None, *, batch_dim: int = 0, process_local: bool = True) -> T:
    """A pytree of host arrays as jax.Arrays whose axis `batch_dim` is split over the mesh's batch axes.

    `process_local`: each process holds its own rows and the global batch is their concatenation; sequence axes
    (`batch_dim + 1` of arrays that have one) are zero-padded to the longest over all processes, so every process
    builds the same global shape. Otherwise every process holds the same whole batch. Without a mesh the arrays
    go to the default device.
    """
    if mesh is None:
        return jax.tree.map(jax.device_put, tree)
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.asarray(x) for x in leaves]
    copies = jax.process_count() if process_local else 1
    ways = batch_axis_size(mesh)
    for x in leaves:
        if (x.shape[batch_dim] * copies) % ways:
            raise ShardingError(f"a batch of {x.shape[batch_dim] * copies} rows does not split over the mesh's "
                                f"{ways} batch ways; use a multiple of {ways}")
    seq_dim = batch_dim + 1
    if process_local and copies > 1:
        length = process_max(max((x.shape[seq_dim] for x in leaves if x.ndim > seq_dim), default=0))
        leaves = [_pad_axis(x, seq_dim, length) if x.ndim > seq_dim else x for x in leaves]
    out = []
    for x in leaves:
        shape = (*x.shape[:batch_dim], x.shape[batch_dim] * copies, *x.shape[batch_dim + 1:])
        out.append(jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, batch_dim), x, shape))
    return jax.tree.unflatten(treedef, out)


def _pad_axis(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return np.pad(x, widths)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) jax.Array as one numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Throttle:
    """Bounds the jitted calls dispatched but not yet fetched: `push` hands the oldest to `fetch` at `limit`.

    jax 0.10.2 deadlocks on CPU meshes when more than ~32 calls with collectives are queued without a wait (XLA
    aborts with a rendezvous timeout; jax 0.12 does not); every loop that dispatches jitted steps goes through one.
    """

    def __init__(self, limit: int, fetch: Callable[[Any], None]) -> None:
        if limit < 1:
            raise ShardingError(f"in-flight limit {limit}; must be >= 1")
        self.limit, self._fetch = limit, fetch
        self._pending: deque[Any] = deque()

    def push(self, item: Any) -> None:
        """Record a dispatched call's outputs; fetch the oldest once `limit` are pending."""
        self._pending.append(item)
        if len(self._pending) >= self.limit:
            self._fetch(self._pending.popleft())

    def drain(self) -> None:
        """Fetch every pending call, oldest first."""
        while self._pending:
            self._fetch(self._pending.popleft())

    def __len__(self) -> int:
        return len(self._pending)
