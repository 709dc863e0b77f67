"""HF Llama checkpoints (config.json + safetensors, single or sharded) <-> kt-jax Llama, loaded onto a mesh."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from kt_jax.config import read_json_file
from kt_jax.errors import CheckpointError
from kt_jax.model.llama import DTYPES, Llama, LlamaConfig, ShardContext
from kt_jax.sharding import logical_sharding, variable_axes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "added_tokens.json",
)
_OWNED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
)


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name}; choose one of {sorted(DTYPES)}")
    return name


def config_from_hf(hf: dict[str, Any], source: str, dtype: Any = jnp.float32, param_dtype: Any = None) -> LlamaConfig:
    """LlamaConfig from a HF config dict (transformers 4.x rope_theta/rope_scaling or 5.x rope_parameters)."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad or hf.get("model_type", "llama") != "llama":
        name = bad[0] if bad else f"model_type={hf.get('model_type')!r}"
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(f"{source}: unsupported architecture {name}; supported: {supported}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (Llama checkpoints have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing config key(s) {', '.join(missing)}")
    rope_params = dict(hf.get("rope_parameters") or {})
    theta = float(rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = rope_params or dict(hf.get("rope_scaling") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    try:
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())) or None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            param_dtype=_dtype_name(param_dtype if param_dtype is not None else dtype),
            dtype=_dtype_name(dtype),
            hf_extra_json=json.dumps(hf, sort_keys=True),
        )
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: LlamaConfig, torch_dtype: str) -> dict[str, Any]:
    """A config.json dict for transformers' LlamaForCausalLM (original fields kept where we had them)."""
    hf = cfg.hf_extra
    hf.update(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", torch_dtype=torch_dtype,
    )
    hf.pop("dtype", None)
    if "rope_parameters" in hf:
        hf["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling_dict or {})}
    else:
        hf["rope_theta"] = cfg.rope_theta
        hf["rope_scaling"] = cfg.rope_scaling_dict
    return hf


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """(HF tensor name, whether it is stored transposed) for a kt-jax parameter path."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if parts == ["lm_head", "kernel"]:
        return "lm_head.weight", True
    if parts[-1] == "kernel":
        return "model." + ".".join(parts[:-1]) + ".weight", True
    if parts[-1] == "weight":
        return "model." + ".".join(parts), False
    raise CheckpointError(
        f"parameter {'/'.join(parts)} has no HF Llama counterpart (merge LoRA adapters before export)"
    )


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index (sharded) or the single file."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        with safe_open(single, "numpy") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
    hint = f" (found {', '.join(others)}: convert to safetensors)" if others else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _check_names(path: Path, expected: set[str], available: set[str], tied: bool) -> None:
    ignorable = {n for n in available if n.endswith(IGNORED_SUFFIXES)}
    if tied:
        ignorable.add("lm_head.weight")
    missing = sorted(expected - available)
    unexpected = sorted(available - expected - ignorable)
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors: {', '.join(unexpected)}")
        raise CheckpointError(f"{path}: {'; '.join(msg)}")


def load_pretrained(
    path: str | Path,
    mesh: Mesh | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    remat: bool = False,
    attention: str = "xla",
    backward_dots: str = "auto",
) -> Llama:
    """Load a HF Llama directory onto `mesh` (each device reads only its own slice of each tensor).

    `attention` picks the attention backend (xla | splash | cudnn | auto; see kt_jax.model.attention);
    `backward_dots` whether each matmul's backward is written out (auto | explicit | autodiff; kt_jax.ops.matmul).
    """
    path = Path(path)
    config_file = path / "config.json"
    hf = read_json_file(config_file, error=CheckpointError, what="a HF model directory")
    cfg = config_from_hf(hf, str(config_file), dtype=dtype, param_dtype=param_dtype)
    cfg = cfg.replace(remat=remat, attention=attention, backward_dots=backward_dots)
    files = _weight_files(path)
    ctx = ShardContext(mesh) if mesh is not None else None
    abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0), shard_ctx=ctx))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    names = {path_: hf_name(path_) for path_, _ in flat}
    _check_names(path, {n for n, _ in names.values()}, set(files), cfg.tie_word_embeddings)
    target = DTYPES[cfg.param_dtype]
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, "numpy")) for f in sorted(set(files.values()))}
        for param_path, var in flat:
            name, transposed = names[param_path]
            tensor = handles[files[name]].get_slice(name)
            stored = tuple(tensor.get_shape())
            shape = tuple(var.get_value().shape)
            if (stored[::-1] if transposed else stored) != shape:
                expect = shape[::-1] if transposed else shape
                raise CheckpointError(f"{files[name]}: tensor {name} has shape {stored}, config implies {expect}")
            if mesh is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            else:
                sharding = logical_sharding(variable_axes(var), shape, mesh, what=name)
            var.set_value(jax.make_array_from_callback(shape, sharding, _slice_reader(tensor, transposed, target)))
    return nnx.merge(graphdef, nnx.from_flat_state(dict(flat)))


def _slice_reader(tensor: Any, transposed: bool, dtype: Any) -> Callable[[Any], np.ndarray]:
    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) if index else (slice(None),) * len(tensor.get_shape())
        data = tensor[index[::-1]].T if transposed else tensor[index]
        return np.ascontiguousarray(np.asarray(data).astype(dtype))

    return read


def _host_array(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: Llama, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    for param_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(param_path)
        host = _host_array(var.get_value())
        host = host.T if transposed else host
        yield name, np.ascontiguousarray(host.astype(dtype))


def save_pretrained(
    model: Llama,
    path: str | Path,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    copy_tokenizer_from: str | Path | None = None,
) -> Path:
    """Write `model` as a HF directory (config.json + safetensors, sharded above max_shard_bytes)."""
    path = Path(path)
    cfg = model.config
    np_dtype = jnp.dtype(dtype if dtype is not None else DTYPES[cfg.param_dtype])
    tensors = dict(_hf_tensors(model, np_dtype))  # every process joins the gathers; only process 0 writes
    if jax.process_index() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if max_shard_bytes and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf = config_to_hf(cfg, _dtype_name(np_dtype))
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    if copy_tokenizer_from is not None:
        for fname in TOKENIZER_FILES:
            src = Path(copy_tokenizer_from) / fname
            if src.exists():
                shutil.copy2(src, path / fname)
    return path


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
