"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, both ways.

Tensor names are PEFT's for a `LlamaForCausalLM`: `base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.`
`lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]), the PyTorch Linear layout (our A is [in, r] and B
[r, out]: stored transposed). PEFT scales by lora_alpha / r exactly as `LoRALinear` does, so
`PeftModel.from_pretrained(hf_base, adapter_dir)` computes what the kt-jax model with the adapter computes. On
import, rsLoRA, DoRA, per-module rank/alpha patterns, partial layers and trained biases are refused (our
`LoRALinear` has none of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from kt_jax.config import read_json_file
from kt_jax.errors import CheckpointError, ConfigError
from kt_jax.model.lora import ATTN_TARGETS, MLP_TARGETS, LoRAConfig
from kt_jax.sharding import to_host

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model."
_PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
# adapter_config.json keys (with PEFT's defaults) whose other values change what the adapter computes; the first
# ones are written on export (keys every PEFT >= 0.10 reads), all are refused on import when not at the default.
_WRITTEN = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None, "layer_replication": None}
_UNSUPPORTED = {**_WRITTEN, "lora_bias": False, "trainable_token_indices": None, "target_parameters": None,
                "use_qalora": False, "use_bdlora": None}


def peft_key(path: tuple[Any, ...]) -> str:
    """PEFT's tensor name for a kt-jax LoRA variable path (e.g. layers/0/self_attn/q_proj/lora_a)."""
    parts = [str(p) for p in path]
    if parts[-1] not in _PEFT_NAMES:
        raise CheckpointError(f"{'/'.join(parts)} is not a LoRA adapter variable")
    return PREFIX + ".".join(parts[:-1]) + f".{_PEFT_NAMES[parts[-1]]}.weight"


def _lora_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """PEFT tensor name -> the model's LoRA variable."""
    return {peft_key(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def adapter_config_dict(cfg: LoRAConfig, base_model: str) -> dict[str, Any]:
    """The adapter_config.json PEFT reads for `cfg` on `base_model`."""
    order = ATTN_TARGETS + MLP_TARGETS
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "init_lora_weights": True, "inference_mode": True,
            "target_modules": sorted(cfg.targets, key=order.index), **_WRITTEN}


def save_adapter(model: nnx.Module, path: str | Path, cfg: LoRAConfig, base_model: str) -> Path:
    """Write `model`'s adapters (trained under `cfg`) as a PEFT adapter directory; returns the path."""
    path = Path(path)
    variables = _lora_variables(model)
    if not variables:
        raise CheckpointError(f"{path}: the model has no LoRA adapter to save")
    tensors = {name: np.ascontiguousarray(to_host(var.get_value()).T) for name, var in variables.items()}
    if jax.process_index() != 0:  # every process joined the gathers; process 0 writes
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(cfg, base_model), indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (ConfigError naming the file and key when we cannot run it).

    `lora_dropout` is not carried over: it only shapes training, and kt-jax trains adapters without dropout.
    """
    file = Path(path) / ADAPTER_CONFIG
    raw = read_json_file(file, what="a PEFT adapter directory")
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    for key, default in _UNSUPPORTED.items():
        if raw.get(key, default) and raw.get(key, default) != default:
            raise ConfigError(f"{file}: {key}={raw[key]!r} is not supported (kt-jax LoRA: plain alpha/r scaling, "
                              "every layer, no bias)")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{file}: target_modules must be a list of projection names, got {targets!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), int | float) or isinstance(raw.get(key), bool):
            raise ConfigError(f"{file}: {key} must be a number, got {raw.get(key)!r}")
    known = ATTN_TARGETS + MLP_TARGETS
    cfg = LoRAConfig(targets=tuple(sorted(targets, key=lambda t: known.index(t) if t in known else len(known))),
                     rank=int(raw["r"]), alpha=float(raw["lora_alpha"]))
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return cfg


def check_adapter_config(path: str | Path, cfg: LoRAConfig, field: str = "lora") -> LoRAConfig:
    """The adapter's LoRAConfig, after checking that `cfg` asks for the same rank, alpha and targets."""
    found = read_adapter_config(path)
    file = Path(path) / ADAPTER_CONFIG
    pairs = (("target_modules", "targets", sorted(found.targets), sorted(cfg.targets)),
             ("r", "rank", found.rank, cfg.rank), ("lora_alpha", "alpha", found.alpha, float(cfg.alpha)))
    for key, ours, theirs, mine in pairs:
        if theirs != mine:
            raise ConfigError(f"{file}: {key}={theirs} but {field}.{ours}={mine}; set {field}.{ours} to the "
                              "adapter's value (the adapter keeps its shape)")
    return found


def load_adapter(model: nnx.Module, path: str | Path) -> nnx.Module:
    """Set `model`'s LoRA A/B (in place, keeping their shardings) from a PEFT adapter directory; returns the model.

    The model must already carry adapters of the adapter's shape (`apply_lora` with `read_adapter_config(path)`).
    """
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.exists():
        pickled = Path(path) / "adapter_model.bin"
        hint = f" ({pickled.name} found: re-save it with safetensors)" if pickled.exists() else ""
        raise CheckpointError(f"{file}: not found (is {path} a PEFT adapter directory?){hint}")
    variables = _lora_variables(model)
    with safe_open(file, "numpy") as f:
        names = set(f.keys())
        missing, unexpected = sorted(set(variables) - names), sorted(names - set(variables))
        if missing or unexpected:
            what = "; ".join(f"{label} tensor(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
            raise CheckpointError(f"{file}: {what}")
        for name, var in variables.items():
            old = var.get_value()
            tensor = f.get_tensor(name)
            if tensor.shape[::-1] != old.shape:
                raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the model's adapter "
                                      f"implies {tuple(old.shape[::-1])}")
            host = np.ascontiguousarray(tensor.T.astype(old.dtype))
            var.set_value(jax.make_array_from_callback(host.shape, old.sharding, lambda idx, h=host: h[idx]))
    return model
