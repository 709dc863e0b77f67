"""Tiny random HF Llama checkpoints built locally with transformers (torch CPU), for tests and benchmarks.

Test scaffolding, not library code: it needs torch. Benchmarks load it by path (`benchmarks/common.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LLAMA2_TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    max_position_embeddings=512,
)
LLAMA3_TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    max_position_embeddings=1024,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
)


def make_hf_llama(
    path: str | Path, seed: int = 0, max_shard_size: str | int | None = None, scale: float = 0.08, **overrides: Any
) -> Path:
    """Save a random transformers LlamaForCausalLM (float32) to `path`; returns the path.

    Weights are drawn with a larger spread than HF's init (and random norm scales) so logits are far from
    uniform and parity tests can fail.
    """
    import torch
    import transformers

    kwargs = {**LLAMA2_TINY, **overrides}
    config = transformers.LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, scale)
    path = Path(path)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    return path


def hf_logits(path: str | Path, input_ids: Any, **forward_kwargs: Any) -> Any:
    """float32 logits [B, T, V] (numpy) from transformers' LlamaForCausalLM loaded from `path`."""
    import numpy as np
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(np.array(input_ids), dtype=torch.long), **forward_kwargs)
    return out.logits.float().numpy()
