"""Batched sampling with a KV cache: one jitted prefill + lax.while_loop decode per (batch, prompt bucket) shape."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kt_jax.data.packing import bucket_length
from kt_jax.data.templates import encode_prompt
from kt_jax.errors import ConfigError
from kt_jax.sharding import batch_axis_size, to_device, to_host

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # prompts pad to a power of two >= 16 tokens (capped at max_prompt_len): `packing.bucket_length`


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token; greedy when `do_sample` is false or `temperature` is 0."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature}; must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k}; must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p}; must be in (0, 1]")

    @property
    def greedy_decoding(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @classmethod
    def greedy(cls, max_new_tokens: int = 512) -> SamplingConfig:
        """Argmax decoding."""
        return cls(max_new_tokens=max_new_tokens, do_sample=False)

    @classmethod
    def knowtuning(cls, max_new_tokens: int = 512) -> SamplingConfig:
        """The original's test decoding (LLaMA-Factory 0.5.3 defaults): T=0.95, top-p 0.7, top-k 50, 512 tokens."""
        return cls(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.95, top_k=50, top_p=0.7)

    @classmethod
    def preset(cls, name: str, max_new_tokens: int | None = None) -> SamplingConfig:
        """A named preset: 'greedy' or 'knowtuning'."""
        presets = {"greedy": cls.greedy, "knowtuning": cls.knowtuning}
        if name not in presets:
            raise ConfigError(f"unknown sampling preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]() if max_new_tokens is None else presets[name](max_new_tokens)


def filter_logits(logits_BxV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (HF's order); removed tokens get -inf. float32 [B, V]."""
    logits = logits_BxV.astype(jnp.float32)
    if sampling.temperature not in (0.0, 1.0):
        logits = logits / sampling.temperature
    neg_inf = jnp.float32(-jnp.inf)
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_B = jax.lax.top_k(logits, sampling.top_k)[0][:, -1]
        logits = jnp.where(logits < kth_B[:, None], neg_inf, logits)
    if sampling.top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_count_B = jnp.maximum(jnp.sum(mass_before < sampling.top_p, axis=-1), 1)
        threshold_B = jnp.take_along_axis(sorted_BxV, keep_count_B[:, None] - 1, axis=-1)
        logits = jnp.where(logits < threshold_B, neg_inf, logits)
    return logits


def next_tokens(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row [B] int32: argmax, or a draw from the filtered distribution with each row's key."""
    if sampling.greedy_decoding:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if 0 < sampling.top_k < logits_BxV.shape[-1]:
        # top-p acts after top-k, so only the k candidates matter: no sort over the whole vocabulary
        values_BxK, index_BxK = jax.lax.top_k(logits_BxV.astype(jnp.float32), sampling.top_k)
        filtered = filter_logits(values_BxK, dataclasses.replace(sampling, top_k=0))
        pick_B = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys_B, filtered)
        return jnp.take_along_axis(index_BxK, pick_B[:, None], axis=1)[:, 0].astype(jnp.int32)
    filtered = filter_logits(logits_BxV, sampling)
    return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys_B, filtered).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id", "prefill_chunk"))
def _generate_jit(
    graphdef: Any, state: Any, ids_BxP: jax.Array, valid_BxP: jax.Array, rows_B: jax.Array, seed: jax.Array, *,
    sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, prefill_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Prefill + decode loop; returns (new tokens [B, N] padded with pad_id after EOS, finished [B] bool)."""
    model = nnx.merge(graphdef, state)
    b, p = ids_BxP.shape
    n = sampling.max_new_tokens
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(seed), r))(rows_B)
    step_keys = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
    valid = valid_BxP.astype(jnp.int32)
    positions_BxP = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)  # left or right padding alike
    lengths_B = jnp.sum(valid, axis=1)
    last_B = jnp.argmax(jnp.arange(p, dtype=jnp.int32)[None, :] * valid, axis=1)  # last real prompt token

    cache, pieces = model.init_cache(b, p + n), []
    for start in range(0, p, prefill_chunk):  # chunked prefill bounds the [B, chunk, P+N] attention scores
        sl = slice(start, min(p, start + prefill_chunk))
        hidden, cache = model.hidden_states_cached(ids_BxP[:, sl], positions_BxP[:, sl], valid_BxP[:, sl], cache,
                                                   start)
        pieces.append(hidden)
    hidden_BxPxD = jnp.concatenate(pieces, axis=1)
    hidden_Bx1xD = jnp.take_along_axis(hidden_BxPxD, last_B[:, None, None], axis=1)
    first_B = next_tokens(model.logits(hidden_Bx1xD)[:, 0], step_keys(0), sampling)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    is_eos = lambda t_B: jnp.any(t_B[:, None] == eos[None, :], axis=1)
    tokens_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = is_eos(first_B)

    def cond(carry: tuple) -> jax.Array:
        i, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, tokens, done, cache = carry
        prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        pos_Bx1 = (lengths_B + i - 1)[:, None]
        hidden, cache = model.hidden_states_cached(prev_Bx1, pos_Bx1, jnp.ones_like(prev_Bx1, bool), cache, p + i - 1)
        new_B = next_tokens(model.logits(hidden)[:, 0], step_keys(i), sampling)
        new_B = jnp.where(done, pad_id, new_B)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new_B[:, None], i, axis=1)
        return i + 1, tokens, done | is_eos(new_B), cache

    _, tokens_BxN, done_B, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens_BxN, done_B, cache))
    return tokens_BxN, done_B


def generate_ids(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    seed: int = 0,
    batch_size: int = 8,
    padding_side: str = "left",
    max_prompt_len: int | None = None,
    prefill_chunk: int = 512,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (token ids, BOS included if wanted), cut after the first EOS (kept).

    Row i's randomness depends only on (seed, i), so results do not depend on batch size or order.
    Prompts longer than `max_prompt_len` keep their last tokens (the template's answer cue). The prompt is
    prefilled `prefill_chunk` tokens at a time.
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side={padding_side!r}; choose 'left' or 'right'")
    if not prompts:
        return []
    ways = batch_axis_size(mesh) if mesh is not None else 1
    batch_size = -(-max(1, min(batch_size, len(prompts))) // ways) * ways
    prompts = [list(p)[-max_prompt_len:] if max_prompt_len else list(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ConfigError(f"empty prompt at index {next(i for i, p in enumerate(prompts) if not p)}")
    graphdef, state = nnx.split(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        rows = order[start : start + batch_size]
        p = bucket_length(max(len(prompts[i]) for i in rows), max_prompt_len, smallest=MIN_BUCKET)
        ids = np.full((batch_size, p), pad_id, np.int32)
        valid = np.zeros((batch_size, p), bool)
        for j, i in enumerate(rows):
            k = len(prompts[i])
            sl = slice(p - k, p) if padding_side == "left" else slice(0, k)
            ids[j, sl], valid[j, sl] = prompts[i], True
        row_ids = np.array(rows + [len(prompts) + j for j in range(batch_size - len(rows))], np.int32)
        arrays = to_device((ids, valid, row_ids), mesh, process_local=False)
        tokens, _ = _generate_jit(graphdef, state, *arrays, jnp.int32(seed), sampling=sampling,
                                  eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                                  prefill_chunk=max(1, int(prefill_chunk)))
        tokens = to_host(tokens)  # waits for the call: one batch in flight at a time
        for j, i in enumerate(rows):
            out = tokens[j].tolist()
            cut = next((t + 1 for t, tok in enumerate(out) if tok in eos_ids), len(out))
            results[i] = out[:cut]
    return results


def generate(
    model: nnx.Module, tokenizer: Any, prompts: list[str], sampling: SamplingConfig, *, mesh: Mesh | None = None,
    seed: int = 0, add_bos: bool = True, **options: Any,
) -> list[str]:
    """Decoded answers (EOS and special tokens dropped) for already-templated prompts (ids as training's)."""
    eos_ids = options.pop("eos_ids", (tokenizer.eos_id,))
    prompt_ids = [encode_prompt(tokenizer, p, add_bos=add_bos) for p in prompts]
    ids = generate_ids(model, prompt_ids, sampling, eos_ids=eos_ids,
                       pad_id=tokenizer.pad_id, mesh=mesh, seed=seed, **options)
    return [tokenizer.decode([t for t in row if t not in eos_ids]) for row in ids]
