"""Multi-host harness cases: each runs under `jax.distributed` (one of N local processes) and in the pytest process
(1 process, 8 devices) with the same code; tests/test_multihost.py compares the two.

As a script (one process of the multi-process run): `python tests/multihost_worker.py --hf DIR --work DIR --out DIR
CASE...`, with KT_JAX_COORDINATOR / KT_JAX_NUM_PROCESSES / KT_JAX_PROCESS_ID set (read by kt_jax.distributed) and
XLA_FLAGS giving each process its local CPU devices. Every process runs every case (they all join the collectives);
only process 0 writes `OUT/<case>.npz` (or `OUT/<case>.skipped` naming why a case could not run) and `OUT/done.json`.

A case is `fn(ctx) -> dict[str, np.ndarray]`. Add one by writing the function and adding it to CASES; a case whose
modules have not landed raises `Unavailable` and the test skips it with that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MESHES = {"2x4": (2, 1, 4), "8x1": (1, 8, 1)}  # (data, fsdp, tensor) over the 8 global devices
BATCH, SEQ = 8, 16


class Unavailable(Exception):
    """The modules a case needs are not in the package yet."""


@dataclasses.dataclass(frozen=True)
class Context:
    hf_dir: Path  # tiny HF Llama checkpoint (helpers.hf_fixtures.make_hf_llama)
    work_dir: Path  # this run's scratch directory (checkpoints), shared by its processes
    tag: str  # "multi" or "single": keeps the two runs' files apart


class Bytes:
    """UTF-8 bytes as token ids (vocab 256, fits the tiny Llama); 1 = BOS, 2 = EOS, 0 = pad."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids if int(i) > 2).decode(errors="replace")


def to_host(x: Any) -> np.ndarray:
    """A global jax.Array as one numpy array on every process."""
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def mesh_named(name: str) -> Any:
    from kt_jax.sharding import make_mesh

    return make_mesh(*MESHES[name])


def input_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 256, size=(BATCH, SEQ)).astype(np.int32)


def case_forward(ctx: Context) -> dict[str, np.ndarray]:
    """Llama logits of the tiny checkpoint on both meshes (input batch sharded, identical on every process)."""
    from flax import nnx

    from kt_jax.model.hf import load_pretrained
    from kt_jax.sharding import to_device

    out = {}
    for name in MESHES:
        mesh = mesh_named(name)
        model = load_pretrained(ctx.hf_dir, mesh=mesh)
        ids = to_device(input_ids(), mesh, process_local=False)
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
        out[f"logits_{name}"] = to_host(logits)
    return out


def model_state(model: Any) -> dict[str, Any]:
    """The model's parameters as a plain nested dict of jax.Arrays (what orbax saves)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def restore_target(model: Any) -> dict[str, Any]:
    """Abstract arrays (shape, dtype, sharding) matching `model_state(model)`: the layout restored onto."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model_state(model))


def case_orbax(ctx: Context) -> dict[str, np.ndarray]:
    """Save the sharded parameters with orbax from all processes, restore them, compare with the originals."""
    import jax
    import orbax.checkpoint as ocp

    from kt_jax.model.hf import load_pretrained

    model = load_pretrained(ctx.hf_dir, mesh=mesh_named("2x4"))
    state = model_state(model)
    path = (ctx.work_dir / f"orbax_{ctx.tag}").resolve()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state, force=True)
    ckpt.wait_until_finished()
    # restore onto the other mesh shape (fsdp=8), then compare every tensor with the saved one
    target = restore_target(load_pretrained(ctx.hf_dir, mesh=mesh_named("8x1")))
    restored = ckpt.restore(path, target)
    ckpt.close()
    flat_saved = dict(jax.tree_util.tree_leaves_with_path(state))
    diffs, layouts = [], []
    for key, x in jax.tree_util.tree_leaves_with_path(restored):
        diffs.append(float(np.max(np.abs(to_host(x) - to_host(flat_saved[key])))))
        layouts.append(str(x.sharding.spec))
    return {"max_abs_diff": np.asarray(diffs), "num_tensors": np.asarray(len(diffs)),
            "fsdp_sharded": np.asarray(sum("fsdp" in s for s in layouts))}


def case_batch_slices(ctx: Context) -> dict[str, np.ndarray]:
    """Per-process rows -> global arrays (make_array_from_process_local_data); Grain slices -> global batches."""
    import jax
    import jax.numpy as jnp

    from kt_jax.sharding import batch_sharding

    out = {}
    n, k = jax.process_count(), jax.process_index()
    full = np.arange(BATCH * SEQ, dtype=np.int32).reshape(BATCH, SEQ)
    rows = BATCH // n
    for name in MESHES:
        mesh = mesh_named(name)
        sharding = batch_sharding(mesh, 2)
        local = full[k * rows:(k + 1) * rows]
        arr = jax.make_array_from_process_local_data(sharding, local, full.shape)
        out[f"global_{name}"] = to_host(arr)
        rowsum = jax.jit(lambda x: jnp.sum(x, axis=1), out_shardings=batch_sharding(mesh, 1))
        out[f"rowsum_{name}"] = to_host(rowsum(arr))
        owned = np.zeros(BATCH, np.int32)  # how many times this process's devices hold each row
        for shard in arr.addressable_shards:
            owned[shard.index[0]] += 1
        from jax.experimental import multihost_utils

        out[f"owner_{name}"] = np.asarray(multihost_utils.process_allgather(owned)) if n > 1 else owned[None]
    out.update(_grain_batches())
    return out


def _grain_batches() -> dict[str, np.ndarray]:
    """Global SFT batches from the Grain pipeline (each process reads its own slice), as sorted rows per step."""
    from kt_jax.data.loader import DataConfig, make_dataset
    from kt_jax.data.records import QARecord
    from kt_jax.sharding import to_device

    recs = [QARecord(f"Q{i}?", f"A{i}." + "y" * (7 * i % 40)) for i in range(32)]
    cfg = DataConfig(max_len=256, batch_size=8, pack=False, seed=3, num_epochs=1, buckets=(64, 128, 256))
    steps = []
    for batch in make_dataset(recs, Bytes(), cfg):
        ids = to_host(to_device(batch, mesh_named("2x4")).input_ids)
        steps.append(ids[np.lexsort(ids.T[::-1])])  # rows in a canonical order: the set, not who holds which
    return {"grain_steps": np.stack(steps)}


def case_process_zero_rule(ctx: Context) -> dict[str, np.ndarray]:
    """main_process_only writers run once; broadcast_from_main gives every process process 0's value."""
    import jax
    from helpers.multihost import broadcast_from_main

    from kt_jax.distributed import main_process_only, sync

    marker_dir = ctx.work_dir / f"writers_{ctx.tag}"
    marker_dir.mkdir(parents=True, exist_ok=True)

    @main_process_only
    def write(i: int) -> str:
        (marker_dir / f"written_by_{i}").write_text("x")
        return "wrote"

    returned = write(jax.process_index())
    sync("writers")
    mine = {"index": jax.process_index(), "resume_row": 17 + 100 * jax.process_index(), "text": "ü→ok"}
    agreed = broadcast_from_main(mine)
    from jax.experimental import multihost_utils

    gathered = [mine["resume_row"], agreed["resume_row"], int(returned == "wrote"), int(agreed == mine)]
    seen = np.asarray(multihost_utils.process_allgather(np.asarray(gathered))) if jax.process_count() > 1 else \
        np.asarray([gathered])
    return {"per_process": seen, "written": np.asarray(sorted(p.name for p in marker_dir.iterdir())),
            "agreed_text": np.asarray(agreed["text"])}


def sft_records() -> list[Any]:
    from kt_jax.data.records import QARecord

    return [QARecord(f"Q{i}?", f"A{i}." + "y" * (7 * i % 40)) for i in range(32)]


def flat_params(model: Any) -> np.ndarray:
    """Every parameter of `model`, gathered and concatenated (float32, a fixed order)."""
    import jax

    return np.concatenate([to_host(x).ravel() for x in jax.tree_util.tree_leaves(model_state(model))])


def case_lm_steps(ctx: Context) -> dict[str, np.ndarray]:
    """3 SGD steps of masked next-token loss on packed Grain batches (ops.logprobs), data=2 x tensor=4 mesh."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kt_jax.data.loader import DataConfig, make_dataset
    from kt_jax.model.hf import load_pretrained
    from kt_jax.sharding import to_device
    from kt_jax.train.steps import batch_logprobs

    mesh = mesh_named("2x4")
    model = load_pretrained(ctx.hf_dir, mesh=mesh)
    # plain SGD: its update is linear in the gradient, so a wrongly reduced gradient cannot hide (Adam would)
    opt = nnx.jit(lambda m: nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param))(model)
    graphdef, state = nnx.split((model, opt))
    layout = jax.tree.map(lambda x: x.sharding, state)

    def loss_fn(m: Any, batch: dict[str, Any]) -> Any:
        mask = batch.loss_mask
        return -jnp.sum(batch_logprobs(m, batch, chunk_size=256) * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @functools.partial(jax.jit, out_shardings=(layout, None))  # state keeps its layout: one compilation
    def step(state: Any, batch: dict[str, Any]) -> Any:
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    cfg = DataConfig(max_len=256, batch_size=8, seed=5, buckets=(256,))
    batches = (to_device(b, mesh) for b in make_dataset(sft_records(), Bytes(), cfg))
    losses = []
    for _ in range(3):
        state, loss = step(state, next(batches))
        losses.append(float(loss))  # blocks every step
    model, _ = nnx.merge(graphdef, state)
    return {"losses": np.asarray(losses), "params": flat_params(model)}


def kc_records() -> list[Any]:
    from kt_jax.data.records import KCRecord

    return [KCRecord(f"Q{i}?", f"A{i} is right" + "." * (i % 5), f"A{i} is wrong" + "!" * (i % 3)) for i in range(16)]


def _trainer_steps(ctx: Context, preference: bool, resume: bool = False) -> dict[str, np.ndarray]:
    """3 steps of the training core (kt_jax.train: LoRA q/v, AdamW + clipping, SFT or DPO loss) on Grain batches."""
    try:
        from kt_jax.model.lora import LoRAConfig, apply_lora, lora_disabled
        from kt_jax.train.config import DPOConfig, OptimConfig
        from kt_jax.train.loop import stack_micro, to_device
        from kt_jax.train.optimizer import make_optimizer
        from kt_jax.train.state import create_state
        from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step
    except ImportError as e:
        raise Unavailable(f"kt_jax.train not importable ({e})") from None
    import dataclasses as dc

    from kt_jax.data.loader import DataConfig, make_dataset
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.inference.scoring import sequence_logprobs
    from kt_jax.model.hf import load_pretrained

    mesh = mesh_named("2x4")
    model = apply_lora(load_pretrained(ctx.hf_dir, mesh=mesh), LoRAConfig(rank=4), seed=0)
    cfg = DataConfig(max_len=256, batch_size=8, seed=5, buckets=(256,))
    if preference:  # reference log-probs: the base model (LoRA off), one scoring pass, as the pipeline does
        import jax

        from kt_jax.sharding import batch_axis_size

        # grouped rows (the default) split over the mesh's batch ways, as train.job sets them
        cfg = dc.replace(cfg, row_multiple=max(1, batch_axis_size(mesh) // jax.process_count()))
        recs = kc_records()
        pairs = [(alpaca_prompt(r.question), side) for r in recs for side in (r.chosen, r.rejected)]
        with lora_disabled(model):
            ref = sequence_logprobs(model, Bytes(), pairs, max_len=256, mesh=mesh)
        recs = [dc.replace(r, ref_chosen_logp=ref[2 * i][0], ref_rejected_logp=ref[2 * i + 1][0])
                for i, r in enumerate(recs)]
    elif not resume:  # one example per packed row: each global batch holds the same examples on any topology
        recs = sft_records()
    else:  # answer lengths vary enough that the two processes' packed rows use up different numbers of examples
        from kt_jax.data.records import QARecord

        recs = [QARecord(f"Q{i}?", f"A{i}." + "y" * (i * 37 % 230)) for i in range(48)]
        cfg = dc.replace(cfg, max_len=512, buckets=(512,))
    tx = make_optimizer(OptimConfig(learning_rate=1e-2), total_steps=3)
    ts = create_state(model, tx, mesh)
    loss_fn = make_dpo_loss(DPOConfig()) if preference else make_sft_loss()
    step = make_train_step(ts, tx, loss_fn)
    from kt_jax.data.batch import Task

    task = Task.DPO if preference else Task.SFT
    data = iter(make_dataset(recs, Bytes(), cfg, task=task))
    import jax

    flat = lambda params: np.concatenate([to_host(x).ravel() for x in jax.tree_util.tree_leaves(params)])
    start = flat(ts.params)  # (a host copy: the step donates its inputs)
    losses, out = [], {}

    def one_step() -> None:
        ts.params, ts.opt_state, metrics = step(ts.params, ts.opt_state, ts.frozen,
                                                to_device(stack_micro([next(data)]), mesh))
        ts.step += 1
        losses.append(float(np.asarray(metrics["loss"])))  # blocks every step

    for _ in range(3):
        one_step()
        if ts.step == 2 and resume:  # checkpoint (state + this process's data position) after step 2
            from kt_jax.train.checkpoint import Checkpoints

            ckpt = Checkpoints(ctx.work_dir / f"train_ckpt_{ctx.tag}", keep=2, async_save=True)
            ckpt.save(ts, data.get_state(), {"note": "after step 2"})
            ckpt.wait()
            out["params_at_save"] = flat(ts.params)
            out["data_state_saved"] = np.asarray(json.dumps(data.get_state(), sort_keys=True))
    out.update({"losses": np.asarray(losses), "trained": flat(ts.params), "start": start,
                "num_trained": np.asarray(ts.num_trainable())})
    if resume:  # restore step 2 and the data position, redo step 3
        data_state, meta = ckpt.restore(ts)
        ckpt.close()
        out["params_restored"] = flat(ts.params)
        data = iter(make_dataset(recs, Bytes(), cfg, task=task))
        data.set_state(data_state)
        losses.clear()
        one_step()
        out.update({"resumed_loss": np.asarray(losses), "resumed_trained": flat(ts.params),
                    "resumed_step": np.asarray(ts.step), "data_state_restored": np.asarray(
                        json.dumps(data_state, sort_keys=True)), "meta_note": np.asarray(meta["note"])})
        import jax
        from jax.experimental import multihost_utils

        # did every process get back its own data position? (they differ between the processes here)
        same = data_state == json.loads(str(out["data_state_saved"]))
        position = json.loads(str(out["data_state_saved"]))["next"]
        gathered = np.asarray([int(same), position])
        out["own_data_state"] = (np.asarray(multihost_utils.process_allgather(gathered)) if jax.process_count() > 1
                                 else gathered[None])
    return out


def case_sft_train(ctx: Context) -> dict[str, np.ndarray]:
    """kt_jax.train SFT steps (LoRA) on packed Grain batches."""
    return _trainer_steps(ctx, preference=False)


def case_sft_resume(ctx: Context) -> dict[str, np.ndarray]:
    """kt_jax.train SFT steps with a Checkpoints save after step 2, then restore (state + Grain position), redo 3."""
    return _trainer_steps(ctx, preference=False, resume=True)


def case_dpo_train(ctx: Context) -> dict[str, np.ndarray]:
    """kt_jax.train DPO steps (LoRA, reference = base via scoring) on Grain preference batches."""
    return _trainer_steps(ctx, preference=True)


FACT_ITEMS = [
    ("What is the capital of Veloria?", ["Veloria's capital is Marn.", "Marn lies on the river Tess.", "It is old."]),
    ("Who founded the Order of Ash?", ["Ilse Varn founded it in 1204.", "The order guards the northern pass."]),
    ("Name a Tessian export.", ["Salt.", "Tessia exports salt, copper and wool to its neighbours."]),
]
SEQ_PAIRS = [("### Instruction:\nSay hi.\n\n### Response:\n", "Hi there."),
             ("### Instruction:\nCount to three.\n\n### Response:\n", "One, two, three.")]


def case_scoring(ctx: Context) -> dict[str, np.ndarray]:
    """Fact perplexities (prefix-shared packing) on both meshes, and DPO reference log-probs (sequence_logprobs)."""
    try:
        from kt_jax.inference.scoring import fact_perplexities, sequence_logprobs
    except ImportError as e:
        raise Unavailable(f"kt_jax.inference.scoring not importable ({e})") from None
    from kt_jax.model.hf import load_pretrained

    out = {}
    for name in MESHES:
        mesh = mesh_named(name)
        model = load_pretrained(ctx.hf_dir, mesh=mesh)
        ppl = fact_perplexities(model, Bytes(), FACT_ITEMS, max_len=256, mesh=mesh, progress=False, batch_size=8)
        out[f"ppl_{name}"] = np.asarray([p for row in ppl for p in row])
        if name == "2x4":
            seq = sequence_logprobs(model, Bytes(), SEQ_PAIRS, max_len=256, mesh=mesh)
            out["seq_logprob"] = np.asarray([lp for lp, _ in seq])
            out["seq_tokens"] = np.asarray([n for _, n in seq])
    return out


CASES: dict[str, Callable[[Context], dict[str, np.ndarray]]] = {
    "forward": case_forward,
    "orbax": case_orbax,
    "batch_slices": case_batch_slices,
    "scoring": case_scoring,
    "process_zero_rule": case_process_zero_rule,
    "lm_steps": case_lm_steps,
    "sft_train": case_sft_train,
    "sft_resume": case_sft_resume,
    "dpo_train": case_dpo_train,
}


def run_case(name: str, ctx: Context) -> dict[str, np.ndarray] | str:
    """The case's results, or the reason it cannot run (a module it needs has not landed)."""
    try:
        return CASES[name](ctx)
    except Unavailable as e:
        return str(e)


def watchdog(deadline_s: float) -> None:
    """Exit hard when the parent (pytest) is gone or the deadline passes: jax.distributed traps SIGTERM, and an
    orphaned worker stuck in a loop would otherwise burn CPU forever."""
    import os
    import threading

    parent, end = os.getppid(), time.monotonic() + deadline_s

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent or time.monotonic() > end:
                os._exit(124)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds before the worker exits anyway")
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = parser.parse_args(argv)
    watchdog(args.deadline)

    from kt_jax.distributed import initialize_from_env, is_main_process, process_summary, setup_logging

    initialize_from_env(initialization_timeout=60)
    setup_logging()
    logging.getLogger("multihost_worker").info("summary: running %s", ", ".join(args.cases))
    logging.getLogger("multihost_worker").warning("every process warns")
    ctx = Context(args.hf, args.work, "multi")
    seconds = {}
    for name in args.cases:
        start = time.perf_counter()
        result = run_case(name, ctx)
        seconds[name] = round(time.perf_counter() - start, 2)
        if is_main_process():  # the rule: only process 0 writes
            args.out.mkdir(parents=True, exist_ok=True)
            if isinstance(result, str):
                (args.out / f"{name}.skipped").write_text(result)
            else:
                np.savez(args.out / f"{name}.npz", **result)
    if is_main_process():
        (args.out / "done.json").write_text(json.dumps({**process_summary(), "seconds": seconds}))
    print(json.dumps({**process_summary(), "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
