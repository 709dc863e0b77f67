"""orbax checkpoints: trained params, optimizer state, step, data-iterator state and loop metadata saved together.

`latest/` keeps the last N steps (async saves); `best/` keeps the parameters with the lowest held-out loss.
Restoring targets the *current* state's shardings, so a checkpoint written on one mesh shape restores onto
another. Optimizer state is stored as its flat leaf list (restored into the live optax tree structure).
The data-iterator state is per process (each process reads its own slice of the data): every process's state is
gathered before the save and stored in one JSON item, `{"process_count": N, "per_process": [state_0, ...]}`, so it
is written atomically with the orbax step; on restore each process takes its own entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kt_jax.errors import CheckpointError
from kt_jax.train.state import TrainState

ITEMS = ("params", "opt_state", "data", "meta")
PER_PROCESS = "per_process"  # key of the list of data-iterator states, one per process, in the `data` item


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the target shardings (the live arrays' when none are given)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _leaves_dict(tree: Any) -> dict[str, Any]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def gather_process_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's JSON state, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    lengths_P = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    padded_L = np.zeros(int(lengths_P.max()), np.uint8)
    padded_L[:raw.size] = raw
    bytes_PxL = np.asarray(multihost_utils.process_allgather(padded_L))
    return [json.loads(bytes_PxL[i, :n].tobytes().decode()) for i, n in enumerate(lengths_P.tolist())]


def select_process_state(saved: dict[str, Any], where: str) -> dict[str, Any]:
    """This process's entry of a saved `data` item (a checkpoint without per-process states is returned as is)."""
    if PER_PROCESS not in saved:
        return saved
    states, count = saved[PER_PROCESS], jax.process_count()
    if len(states) == count:
        return dict(states[jax.process_index()] or {})
    if all(st == states[0] for st in states):  # e.g. no iterator state at all: safe on any process count
        return dict(states[0] or {})
    raise CheckpointError(f"{where}: the data-iterator state was saved by {len(states)} processes but this run has "
                          f"{count}; each process's data position depends on the process count, so this checkpoint "
                          f"can only resume with {len(states)} processes")


class Checkpoints:
    """Latest-N (async) and best checkpoints of one run under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.latest = ocp.CheckpointManager(self.directory / "latest", options=opts, item_names=ITEMS)
        best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
        self.best = ocp.CheckpointManager(self.directory / "best", options=best_opts, item_names=("params", "meta"))

    def save(self, ts: TrainState, data_state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
        """Save step `ts.step` (returns once device buffers are copied; the write finishes in the background)."""
        self.latest.save(ts.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(ts.params),
            opt_state=ocp.args.StandardSave(_leaves_dict(ts.opt_state)),
            data=ocp.args.JsonSave({"process_count": jax.process_count(),
                                    PER_PROCESS: gather_process_states(data_state or {})}),
            meta=ocp.args.JsonSave({**meta, "step": ts.step})))

    def save_best(self, ts: TrainState, meta: dict[str, Any]) -> None:
        """Replace the best checkpoint with the current params."""
        for step in self.best.all_steps():
            self.best.delete(step)
        self.best.save(ts.step, args=ocp.args.Composite(params=ocp.args.StandardSave(ts.params),
                                                        meta=ocp.args.JsonSave({**meta, "step": ts.step})))

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.latest.latest_step()

    def restore(self, ts: TrainState, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load params/opt_state/step into `ts` (onto its shardings); returns (data state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory / 'latest'}: no checkpoint to restore")
        opt_leaves, treedef = jax.tree.flatten(ts.opt_state)
        opt_sh = jax.tree.leaves(ts.opt_shardings) if ts.opt_shardings is not None else None
        try:
            out = self.latest.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(ts.params, ts.param_shardings)),
                opt_state=ocp.args.StandardRestore(_leaves_dict(_abstract(opt_leaves, opt_sh))),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory / 'latest' / str(step)}: cannot restore ({e})") from None
        data_state = select_process_state(dict(out["data"] or {}), str(self.directory / "latest" / str(step) / "data"))
        ts.params = out["params"]
        ts.opt_state = jax.tree.unflatten(treedef, [out["opt_state"][k] for k in sorted(out["opt_state"])])
        ts.step = int(out["meta"]["step"])
        return data_state, dict(out["meta"])

    def restore_best(self, ts: TrainState) -> dict[str, Any] | None:
        """Load the best params into `ts.params`; returns its meta, or None when there is no best checkpoint."""
        step = self.best.latest_step()
        if step is None:
            return None
        out = self.best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(ts.params, ts.param_shardings)), meta=ocp.args.JsonRestore()))
        ts.params = out["params"]
        return dict(out["meta"])

    def wait(self) -> None:
        """Block until pending async saves are written."""
        self.latest.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self.latest.wait_until_finished()
        self.latest.close()
        self.best.close()
