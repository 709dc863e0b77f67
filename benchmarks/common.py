"""Shared benchmark helpers: measured float32 matmul peak (jax and torch), Llama FLOP counts, machine load, and
random HF Llama checkpoints (the tests' builder, `tests/helpers/hf_fixtures.py`, loaded by path).

Import from a benchmark with `sys.path.insert(0, str(Path(__file__).resolve().parent))` then `import common`
(or `from benchmarks import common` when run from the repository root with `python -m`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_jax import host_memory

# What the kt-jax program does before JAX starts its threads; in one process it applies to both sides of a
# comparison (PyTorch's CPU allocator uses the same malloc), and Peak.line says whether it took effect.
host_memory.keep_freed_memory()

# ~58M parameters: Llama-2 vocabulary, 8 layers of width 512 (the size the issues ask benchmarks to use)
BENCH_LLAMA_60M: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    max_position_embeddings=2048,
)

_HF_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "hf_fixtures.py"


def make_hf_llama(path: str | Path, **kwargs: Any) -> Path:
    """Save a random HF Llama (float32, torch) to `path` with the tests' builder; returns the path."""
    spec = importlib.util.spec_from_file_location("kt_jax_bench_hf_fixtures", _HF_FIXTURES)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{_HF_FIXTURES}: the test helpers are not in this checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_hf_llama(path, **kwargs)


def best_seconds(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Best wall time of `reps` calls of `fn` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_jax(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of a jitted n x n x n matmul with jax on the default device (best of reps): the rate the
    run reports print (`kt_jax.plan.measured_matmul_gflops`)."""
    from kt_jax.plan import measured_matmul_gflops

    return measured_matmul_gflops(n, reps) * 1e9


def matmul_peak_torch(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of an n x n x n matmul with torch on the CPU (best of reps)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), reps)


@dataclass(frozen=True)
class Peak:
    """Measured float32 matmul peaks in FLOP/s; `best` is what achieved FLOP/s are divided by."""

    jax: float
    torch: float

    @property
    def best(self) -> float:
        return max(self.jax, self.torch)

    def line(self) -> str:
        return (f"float32 matmul peak (2048^3, best of 5): jax {self.jax / 1e9:.1f} GFLOP/s, "
                f"torch {self.torch / 1e9:.1f} GFLOP/s; host malloc: {host_memory.describe()}")


def matmul_peak(n: int = 2048, reps: int = 5) -> Peak:
    """This machine's measured float32 matmul peak with jax and with torch."""
    return Peak(matmul_peak_jax(n, reps), matmul_peak_torch(n, reps))


def _get(cfg: Any, hf_name: str, our_name: str) -> int:
    if isinstance(cfg, dict):
        return int(cfg[hf_name])
    return int(getattr(cfg, our_name))


def llama_dims(cfg: Any) -> dict[str, int]:
    """Dimensions of a Llama from a HF config dict (config.json keys) or a kt_jax LlamaConfig."""
    d = _get(cfg, "hidden_size", "hidden_size")
    heads = _get(cfg, "num_attention_heads", "num_heads")
    kv = int(cfg.get("num_key_value_heads", heads)) if isinstance(cfg, dict) else int(cfg.num_kv_heads)
    hd = int(cfg.get("head_dim") or d // heads) if isinstance(cfg, dict) else int(cfg.head_dim)
    return dict(d=d, f=_get(cfg, "intermediate_size", "intermediate_size"), v=_get(cfg, "vocab_size", "vocab_size"),
                layers=_get(cfg, "num_hidden_layers", "num_layers"), heads=heads, kv=kv, hd=hd)


def matmul_params(cfg: Any, lm_head: bool = True) -> int:
    """Weights used in matmuls per token: attention + MLP projections of every layer (+ the LM head)."""
    m = llama_dims(cfg)
    attn = m["d"] * m["hd"] * (2 * m["heads"] + 2 * m["kv"])
    return m["layers"] * (attn + 3 * m["d"] * m["f"]) + (m["d"] * m["v"] if lm_head else 0)


def forward_flops(cfg: Any, tokens: int, context: float, lm_head_tokens: int | None = None) -> float:
    """Forward FLOPs for `tokens` query tokens that each attend to `context` keys on average.

    2 FLOPs per matmul weight per token, plus QK^T and PV: 4 * heads * head_dim * context per token per layer.
    For a dense [B, T] batch computed with a full (masked) T x T attention, pass tokens=B*T and context=T;
    for the causal useful work of one sequence of length T, context=(T+1)/2. The LM head runs on
    `lm_head_tokens` positions (default: all `tokens`).
    """
    m = llama_dims(cfg)
    attn = 4 * m["layers"] * m["heads"] * m["hd"] * context
    head = tokens if lm_head_tokens is None else lm_head_tokens
    return tokens * (2 * matmul_params(cfg, lm_head=False) + attn) + head * 2 * m["d"] * m["v"]


def machine_load() -> str:
    """The 1-minute load average against the CPU count, to record how busy the machine was."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unavailable"
    cpus = os.cpu_count() or 1
    state = "busy" if one > 0.75 * cpus else "quiet"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {cpus} CPUs: {state}"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
