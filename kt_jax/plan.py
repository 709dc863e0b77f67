"""Memory and FLOPs of a run before renting hardware: the real SFT/DPO train steps and the scoring call, compiled
for the configured model and mesh on abstract shapes (no weights are allocated), measured by XLA's own
`memory_analysis()` / `cost_analysis()` of the compiled executables.

What the numbers are: per-device bytes of the step's arguments (params, frozen weights, optimizer state, batch),
outputs, and temporaries (activations, gradients, workspace) as XLA's buffer assignment for the compiling
platform lays them out, and the per-device FLOPs XLA counts for one step. Compiled for emulated CPU devices
they are an order-of-magnitude check of a TPU or GPU run: another backend fuses, rematerialises and assigns buffers
differently, pads to its own tiled layouts, and loses some HBM to fragmentation and the runtime; see `CAVEATS`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kt_jax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device as JAX sees it: its memory and its dense bf16 peak."""

    name: str
    memory_bytes: int
    bf16_flops: float


# Per JAX device (one chip: v4/v5p megacore chips are one device). Vendor pages: cloud.google.com/tpu/docs/v4
# (32 GiB HBM2, 275 TFLOPs), /v5e (16 GB, 197 TFLOPs), /v5p (95 GB, 459 TFLOPs), /v6e (32 GB, 918 TFLOPs);
# NVIDIA H100 SXM 80 GB (989 dense bf16 TFLOPs), A100 40/80 GB (312). Memory taken as GiB, as the devices report it.
ACCELERATORS: dict[str, Accelerator] = {
    "v4": Accelerator("TPU v4", 32 * GiB, 275e12),
    "v5e": Accelerator("TPU v5e", 16 * GiB, 197e12),
    "v5p": Accelerator("TPU v5p", 95 * GiB, 459e12),
    "v6e": Accelerator("TPU v6e", 32 * GiB, 918e12),
    "h100": Accelerator("NVIDIA H100 80GB", 80 * GiB, 989e12),
    "a100-40": Accelerator("NVIDIA A100 40GB", 40 * GiB, 312e12),
    "a100-80": Accelerator("NVIDIA A100 80GB", 80 * GiB, 312e12),
}

# config.json values of meta-llama/Llama-2-7b-hf and meta-llama/Llama-3.1-8B (architecture only).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                  "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                  "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
}

CAVEATS = (
    "compiled for {platform} devices: XLA's buffer assignment, fusion, scheduling and rematerialisation differ "
    "per backend (on CPU, `kt-jax plan` picks XLA:CPU's memory-minimising scheduler: CPU_SCHEDULER_FLAG), "
    "so treat the bytes as an order-of-magnitude check of a TPU/GPU run, not a guarantee",
    "arguments (parameters, frozen weights, optimizer state, batch) follow from shapes, dtypes and the mesh alone: "
    "they carry over to any backend (up to layout padding); temporaries do not",
    "with FSDP, XLA:CPU's schedule keeps many layers' all-gathered weights live at once, so CPU temporaries can "
    "approach the whole model's size; TPU/GPU schedulers gather layer by layer and need less",
    "no TPU tiled layouts (padding to (8,128) tiles can add memory for small or odd dimensions)",
    "no HBM fragmentation or runtime reserve: keep ~10-15% headroom below the device's memory",
    "FLOPs are XLA's count for the compiled program (per device), not a time estimate",
)
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"  # the default keeps more buffers live
TIGHT = 0.85  # above this share of device memory the verdict is "tight"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """XLA's analysis of one compiled program, per device."""

    name: str
    tokens: int  # tokens processed per call (global)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once)
    temp_bytes: int
    flops: float  # per device
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Peak per-device footprint: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """The plan of a run: model, mesh, platform compiled for, accelerator judged against, one StepPlan per program."""

    model: str
    num_params: int
    trainable: dict[str, int]
    mesh: dict[str, int]
    platform: str
    accelerator: Accelerator
    steps: tuple[StepPlan, ...]

    @property
    def devices(self) -> int:
        n = 1
        for v in self.mesh.values():
            n *= v
        return n

    def verdict(self, step: StepPlan) -> str:
        """fits | tight (over 85% of the device's memory) | does not fit."""
        share = step.total_bytes / self.accelerator.memory_bytes
        return "does not fit" if share > 1 else ("tight" if share > TIGHT else "fits")

    def table(self) -> list[dict[str, Any]]:
        """One row per program: bytes per device, FLOPs per device and in all, and the verdict."""
        return [{"program": s.name, "tokens": s.tokens, "arguments": s.argument_bytes, "outputs": s.output_bytes,
                 "aliased": s.alias_bytes, "temporaries": s.temp_bytes, "total": s.total_bytes,
                 "flops_per_device": s.flops, "flops_total": s.flops * self.devices,
                 "share_of_memory": s.total_bytes / self.accelerator.memory_bytes,
                 "arguments_share": s.argument_bytes / self.accelerator.memory_bytes, "verdict": self.verdict(s),
                 "compile_seconds": s.compile_seconds} for s in self.steps]

    def render(self) -> str:
        """The plan as text: a header, the table, and what the estimate can and cannot tell."""
        gib = lambda b: f"{b / GiB:8.2f}"
        lines = [f"model {self.model}: {self.num_params / 1e9:.2f} B params; trained: "
                 + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in self.trainable.items()),
                 f"mesh {self.mesh} = {self.devices} {self.platform} devices; judged against "
                 f"{self.accelerator.name} ({self.accelerator.memory_bytes / GiB:.0f} GiB per device)", "",
                 f"{'program':10s} {'tokens':>8s} {'args GiB':>8s} {'out GiB':>8s} {'temp GiB':>8s} "
                 f"{'total GiB':>9s} {'TFLOP/dev':>10s}  verdict"]
        for row in self.table():
            lines.append(f"{row['program']:10s} {row['tokens']:8d} {gib(row['arguments'])} "
                         f"{gib(row['outputs'] - row['aliased'])} {gib(row['temporaries'])} {gib(row['total'])} "
                         f" {row['flops_per_device'] / 1e12:10.2f}  {row['verdict']} "
                         f"({100 * row['share_of_memory']:.0f}%; arguments alone "
                         f"{100 * row['arguments_share']:.0f}%)")
        lines += ["", "per device; outputs exclude those written into donated arguments. What this can tell:"]
        lines += [f"- {c.format(platform=self.platform).replace('CPU_SCHEDULER_FLAG', CPU_SCHEDULER_FLAG)}"
                  for c in CAVEATS]
        return "\n".join(lines)


def hf_config(base_model: str, preset: str | None) -> tuple[str, dict[str, Any]]:
    """(name, HF config dict): the preset when given, else `base_model`/config.json (no weights read)."""
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--model-config: {preset!r} is not one of {sorted(MODEL_PRESETS)}")
        return preset, MODEL_PRESETS[preset]
    if not base_model:
        raise ConfigError(f"base_model: empty; set base_model=DIR or pick --model-config from {sorted(MODEL_PRESETS)}")
    path = Path(base_model) / "config.json"
    try:
        return base_model, json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (base_model must be a HF model directory)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


def _analyse(name: str, jitted: Any, args: tuple[Any, ...], tokens: int, **kwargs: Any) -> StepPlan:
    """Lower and compile `jitted` on abstract `args`; XLA's memory and cost analysis as a StepPlan."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return StepPlan(name, tokens, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                    int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), float((cost or {}).get("flops", 0.0)),
                    seconds)


def _placed(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the matching leaves of `shardings` (same leaf order)."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    shs = jax.tree.leaves(shardings)
    if len(shs) != len(leaves):
        raise RuntimeError(f"{len(leaves)} abstract leaves but {len(shs)} shardings")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shs,
                                                                                                  strict=True)])


def abstract_model(llama_cfg: Any, mesh: Any, lora: Any = None, seed: int = 0) -> Any:
    """The Llama (with LoRA adapters when `lora` is a LoRAConfig) as an NNX model of ShapeDtypeStructs."""
    from flax import nnx

    from kt_jax.model.llama import Llama, ShardContext
    from kt_jax.model.lora import apply_lora

    def build() -> Any:
        model = Llama(llama_cfg, nnx.Rngs(seed), shard_ctx=ShardContext(mesh))
        return apply_lora(model, lora, seed=seed) if lora is not None else model

    return nnx.eval_shape(build)


def abstract_state(model: Any, tx: Any, mesh: Any) -> Any:
    """`train.state.create_state` traced on an abstract model: a TrainState of placed ShapeDtypeStructs."""
    import jax
    from flax import nnx

    from kt_jax.sharding import state_shardings
    from kt_jax.train.state import create_state

    graphdef, state = nnx.split(model)
    holder: dict[str, Any] = {}

    def init(values: Any) -> Any:
        ts = create_state(nnx.merge(graphdef, values), tx, mesh)
        holder["ts"] = ts
        return ts.params, ts.frozen, ts.opt_state

    params, frozen, opt_state = jax.eval_shape(init, state)
    ts = holder["ts"]
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ts.template)
    return dataclasses.replace(ts, template=template, params=_placed(params, ts.param_shardings),
                               frozen=_placed(frozen, state_shardings(frozen, mesh)),
                               opt_state=_placed(opt_state, ts.opt_shardings))


def abstract_batch(task: Any, accum: int, batch: int, length: int, mesh: Any) -> Any:
    """A [accum, batch, length] SeqBatch (or PreferenceBatch) of ShapeDtypeStructs, batch axis sharded."""
    import jax
    import numpy as np

    from kt_jax.data.batch import PreferenceBatch, SeqBatch
    from kt_jax.sharding import batch_sharding

    rows = jax.ShapeDtypeStruct((accum, batch, length), np.int32, sharding=batch_sharding(mesh, 3, batch_dim=1))
    mask = jax.ShapeDtypeStruct((accum, batch, length), np.float32, sharding=batch_sharding(mesh, 3, batch_dim=1))
    seq = SeqBatch(rows, rows, mask, rows, rows)
    if not task.preference:
        return seq
    ref = jax.ShapeDtypeStruct((accum, batch), np.float32, sharding=batch_sharding(mesh, 2, batch_dim=1))
    return PreferenceBatch(seq, seq, ref, ref)


def _global_batch(batch_size: int, mesh: Any) -> int:
    from kt_jax.sharding import batch_axis_size

    ways = batch_axis_size(mesh)
    return -(-batch_size // ways) * ways  # the loader's batches are padded to a multiple of the batch ways


def plan_train_step(hf: dict[str, Any], tune: Any, task: Any, mesh: Any, name: str) -> tuple[StepPlan, int]:
    """Compile the train step `kt-jax sft/dpo` runs for `tune` (abstractly); (its plan, trained params)."""
    import jax.numpy as jnp

    from kt_jax.model.hf import config_from_hf
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step

    tune.validate()
    llama_cfg = config_from_hf(hf, name, dtype=getattr(jnp, tune.train.compute_dtype),
                               param_dtype=getattr(jnp, tune.train.param_dtype)).replace(remat=tune.train.remat)
    model = abstract_model(llama_cfg, mesh, tune.lora if tune.finetuning == "lora" else None, tune.train.seed)
    tx = make_optimizer(tune.optim, total_steps=1000)
    ts = abstract_state(model, tx, mesh)
    loss_fn = (make_dpo_loss(tune.dpo, tune.train.chunk_size) if task.preference
               else make_sft_loss(tune.train.chunk_size))
    step = make_train_step(ts, tx, loss_fn)
    accum, batch, length = tune.train.grad_accum, _global_batch(tune.data.batch_size, mesh), tune.data.max_len
    micro = abstract_batch(task, accum, batch, length, mesh)
    tokens = accum * batch * length * (2 if task.preference else 1)
    plan = _analyse(task.name.lower(), step, (ts.params, ts.opt_state, ts.frozen, micro), tokens)
    return plan, ts.num_trainable()


def plan_scoring(hf: dict[str, Any], max_len: int, dtype: str, mesh: Any, name: str,
                 batch_size: int | None = None) -> StepPlan:
    """Compile the fact-scoring call (`inference.scoring`) at a full call of its default layout, model in `dtype`:
    rows of `DEFAULT_PACK_LEN` tokens, windows of the longest group (`MAX_GROUP_TOKENS`, a 32-token preamble)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from kt_jax.inference.score_layout import MAX_GROUP_TOKENS, QUERY_ROUND, WINDOW_ROUND, ladder
    from kt_jax.inference.scoring import DEFAULT_BATCH, DEFAULT_PACK_LEN, ScoreBatch, _score_rows
    from kt_jax.model.attention import AttentionWindows
    from kt_jax.model.hf import config_from_hf
    from kt_jax.ops.logprobs import DEFAULT_CHUNK
    from kt_jax.sharding import batch_sharding, state_shardings

    llama_cfg = config_from_hf(hf, name, dtype=getattr(jnp, dtype))
    graphdef, state = nnx.split(abstract_model(llama_cfg, mesh))
    state = _placed(state, state_shardings(state, mesh))
    batch, length = _global_batch(batch_size or DEFAULT_BATCH, mesh), DEFAULT_PACK_LEN
    q = ladder(min(max_len, MAX_GROUP_TOKENS), QUERY_ROUND)
    w, s = ladder(length // q + 1, WINDOW_ROUND), ladder(q + QUERY_ROUND, QUERY_ROUND)

    def array(*shape: int, dtype: Any = np.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=batch_sharding(mesh, len(shape) + 1))

    windows = AttentionWindows(array(w, q), array(w, s), array(w, q, s, dtype=np.bool_), array(length))
    inputs = ScoreBatch(array(length), array(length), windows, array(length), array(length),
                        array(length, dtype=np.bool_))
    return _analyse("scoring", _score_rows, (graphdef, state, inputs), batch * length, chunk_size=DEFAULT_CHUNK)


def load_run_config(path: str, overrides: list[str], model_config: str | None = None) -> Any:
    """A `kt-jax run` config for planning: data paths need not exist (placeholders), the preset may stand in for
    base_model."""
    from kt_jax.config import load_config
    from kt_jax.workflow.config import PipelineConfig

    given = {o.split("=", 1)[0] for o in overrides}
    filler = [f"{k}=(not needed to plan)" for k in ("train_file", "test_file") if k not in given]
    if model_config and "base_model" not in given:
        filler.append(f"base_model={model_config}")
    return load_config(PipelineConfig, path, filler + list(overrides))


def plan_run(cfg: Any, mesh: Any, accelerator: str, model_config: str | None = None) -> Plan:
    """The plan of a `kt-jax run` config (workflow.config.PipelineConfig) on `mesh`, judged against `accelerator`."""
    from kt_jax.data.batch import Task
    from kt_jax.model.hf import config_from_hf

    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator: {accelerator!r} is not one of {sorted(ACCELERATORS)}")
    name, hf = hf_config(cfg.base_model, model_config)
    sft, sft_trained = plan_train_step(hf, cfg.sft, Task.SFT, mesh, name)
    dpo, dpo_trained = plan_train_step(hf, cfg.dpo, Task.DPO, mesh, name)
    scoring = plan_scoring(hf, cfg.knowledge.max_len, cfg.sft.train.compute_dtype, mesh, name)
    return Plan(name, config_from_hf(hf, name).num_params(), {"sft": sft_trained, "dpo": dpo_trained},
                dict(mesh.shape), mesh.devices.flat[0].platform, ACCELERATORS[accelerator], (sft, dpo, scoring))


def measured_matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """This machine's float32 n x n x n matmul rate with jax on the default device (GFLOP/s, best of `reps`).

    Runs print it so a reader can scale a wall time to another machine (the benchmarks print the same number).
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
