"""Fact perplexities and response log-probs: length-bucketed, packed, prefix-shared, windowed, sharded, exact.

Every (prompt, response) pair is tokenized exactly as training does (`templates.encode_pair`, BOS per `add_bos`,
which callers take from the same config as training's `data.add_bos`) and scored with
the training log-prob code (`ops.logprobs.token_logprobs`, on the scored positions only: the LM head never runs on
shared prompts or padding); per-fact sums are taken in float64 on the host. The layouts (`score_layout`: ``shared``,
the default, holds the prompts' common preamble once per row and each question once per group of facts, every
group attending inside its own window; ``packed``; ``padded``) all give the same numbers.

Rows are laid out `batch_size` per call (rounded up to a multiple of the mesh's batch ways), `pack_len` tokens
each, the last call's rows shorter (`score_layout.row_length`). Rows are sharded over the mesh's batch axes; at
most one call is in flight while the next is prepared (`sharding.Throttle`).

Edge cases (documented behaviour):
- a question with no facts gives `[]`; nothing is run for it.
- an empty fact (no tokens; EOS is off for facts) has no scored token: its perplexity is NaN (`n_tokens=0`).
- a fact longer than `max_len` minus the prompt is truncated as training truncates (the prompt is kept, the
  response cut); its perplexity is over the kept tokens and `truncated=True`. A prompt that alone fills
  `max_len` leaves no response token: NaN with `truncated=True`.
- non-ASCII text is whatever the tokenizer makes of it (byte-level/byte-fallback tokenizers cover every string).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kt_jax.data.templates import encode_pair, prompt_text
from kt_jax.errors import ConfigError
from kt_jax.inference.score_layout import (
    MAX_GROUP_TOKENS,
    MIN_BUCKET,
    PACKINGS,
    Call,
    ScoreBatch,
    common_preamble,
    groups,
    lay_out,
    rows,
)
from kt_jax.model.llama import stack_blocks
from kt_jax.ops.logprobs import DEFAULT_CHUNK, token_logprobs
from kt_jax.sharding import Throttle, batch_axis_size, to_device, to_host

__all__ = ["MIN_BUCKET", "PACKINGS", "PairScore", "ScoreBatch", "fact_perplexities", "plan", "score_encoded",
           "score_facts", "sequence_logprobs", "warmup"]
DEFAULT_BATCH = 1  # rows per call (rounded up to the mesh's batch ways): one long row per device
DEFAULT_PACK_LEN = 4096  # tokens per row
# Models whose blocks weigh at most this run them as one scanned body (`Llama.hidden_states(scanned=...)`, a stacked
# copy of the blocks' weights): each distinct call shape then traces, lowers and loads one block, not every layer.
# On the 42M benchmark model (8 layers, 2 cores) a warm `kt-jax score` spent ~6.5 s of ~30 on its 8 call shapes
# unrolled, ~2.5 s scanned (docs/DESIGN.md). Larger models keep the unrolled program: no second copy of their
# weights, and their compute dwarfs the per-shape cost.
SCAN_MAX_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class PairScore:
    """Summed response log-prob (natural log), scored token count, and whether the response was truncated."""

    logprob: float
    n_tokens: int
    truncated: bool

    @property
    def ppl(self) -> float:
        """exp(mean NLL) over the scored tokens; NaN when there are none."""
        return math.exp(-self.logprob / self.n_tokens) if self.n_tokens else math.nan


@functools.partial(jax.jit, static_argnames=("graphdef", "block_graphdef", "chunk_size"))
def _score_rows(graphdef: Any, state: Any, batch: ScoreBatch, stacked: Any = None, *, chunk_size: int,
                block_graphdef: Any = None) -> jax.Array:
    """Target log-probs [B, M] at the gathered scored positions (0 where invalid), attention inside the windows;
    the blocks scanned when `stacked` (with `block_graphdef`, from `llama.stack_blocks`) is given."""
    model = nnx.merge(graphdef, state)
    scanned = (block_graphdef, stacked) if stacked is not None else None
    hidden_BxTxD = model.hidden_states(batch.input_ids, batch.positions, windows=batch.windows, scanned=scanned)
    hidden_BxMxD = jnp.take_along_axis(hidden_BxTxD, batch.gather_idx[:, :, None], axis=1)
    logp_BxM = token_logprobs(hidden_BxMxD, model.lm_head_kernel(), batch.gather_targets, chunk_size=chunk_size)
    return jnp.where(batch.gather_valid, logp_BxM, 0.0)


def _split(model: nnx.Module) -> tuple[Any, Any, dict[str, Any]]:
    """(graphdef, state, the scan arguments of `_score_rows`: empty unless the blocks are stacked, see
    SCAN_MAX_BYTES)."""
    graphdef, state = nnx.split(model)
    layers = getattr(model, "layers", None)
    block_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(layers))) if layers is not None else 0
    stacked = stack_blocks(layers) if layers is not None and block_bytes <= SCAN_MAX_BYTES else None
    if stacked is None:
        return graphdef, state, {}
    return graphdef, state, {"block_graphdef": stacked[0], "stacked": stacked[1]}


def plan(
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int = 1024,
    mesh: Mesh | None = None,
    packing: str = "shared",
    batch_size: int = DEFAULT_BATCH,
    pack_len: int | None = DEFAULT_PACK_LEN,
    max_segments: int = 64,
) -> list[Call]:
    """The jitted calls `score_encoded` makes for these pairs (rows, host arrays, pair per position), in order."""
    if packing not in PACKINGS:
        raise ConfigError(f"packing={packing!r}; choose one of {PACKINGS}")
    if batch_size < 1 or max_segments < 1 or max_len < 2:
        raise ConfigError(f"batch_size={batch_size}, max_segments={max_segments}, max_len={max_len}: must be >= 1/1/2")
    for i, (p, r) in enumerate(pairs):
        if r and len(p) + len(r) > max_len:
            raise ConfigError(f"pair {i} has {len(p) + len(r)} tokens, more than max_len={max_len}")
    pack_len = pack_len or max_len
    preamble = common_preamble(pairs) if packing == "shared" else []
    grouped = groups(pairs, packing, len(preamble), min(max_len, MAX_GROUP_TOKENS), max_segments)
    laid = rows(grouped, packing, len(preamble), pack_len)
    ways = batch_axis_size(mesh) if mesh is not None else 1
    batch_size = -(-batch_size // ways) * ways
    return [lay_out(laid[i:i + batch_size], batch_size, preamble, packing, pack_len)
            for i in range(0, len(laid), batch_size)]


def score_encoded(model: nnx.Module, pairs: Sequence[tuple[list[int], list[int]]], *, mesh: Mesh | None = None,
                  chunk_size: int = DEFAULT_CHUNK, progress: bool = False, **layout: Any) -> list[tuple[float, int]]:
    """(summed response log-prob, scored tokens) for already tokenized (prompt_ids, response_ids) pairs.

    `layout`: `plan`'s keywords (max_len, packing, batch_size, pack_len, max_segments): they change the rows and
    the speed, never the numbers. Each pair with a response must fit in max_len tokens. Responses with no scorable
    token give (0.0, 0).
    """
    calls = plan(pairs, mesh=mesh, **layout)
    expected = {key: s.n_loss for c in calls for row in c.rows for g in row
                for key, s in zip(g.keys, g.segments, strict=True)}
    graphdef, state, scan = _split(model)
    sums, counts = np.zeros(len(pairs)), np.zeros(len(pairs), np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(c.scored_tokens for c in calls), desc="score", unit="tok")

    def collect(logp_BxM: jax.Array, call: Call) -> None:
        # float64 sums on the host: float32 accumulation order would depend on the row layout
        keys, logp = call.pair_keys.ravel(), to_host(logp_BxM).astype(np.float64).ravel()
        valid = keys >= 0
        np.add.at(sums, keys[valid], logp[valid])
        np.add.at(counts, keys[valid], 1)
        if bar is not None:
            bar.update(call.scored_tokens)

    in_flight = Throttle(2, lambda item: collect(*item))  # one call runs while the next is prepared
    for call in calls:
        batch = to_device(call.inputs, mesh, process_local=False)
        in_flight.push((_score_rows(graphdef, state, batch, chunk_size=chunk_size, **scan), call))
    in_flight.drain()
    if bar is not None:
        bar.close()
    for key, n in expected.items():
        if counts[key] != n:
            raise RuntimeError(f"pair {key}: scored {counts[key]} tokens, expected {n}")
    return [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]


def warmup(model: nnx.Module, calls: Sequence[Call], *, mesh: Mesh | None = None,
           chunk_size: int = DEFAULT_CHUNK) -> int:
    """Compile every distinct call shape in `calls` (from `plan`) on dummy inputs; returns how many."""
    graphdef, state, scan = _split(model)
    seen: dict[tuple[tuple[int, ...], ...], ScoreBatch] = {}
    for call in calls:
        seen.setdefault(tuple(np.shape(x) for x in jax.tree.leaves(call.inputs)), call.inputs)
    for inputs in seen.values():
        dummy = jax.tree.map(np.zeros_like, inputs)
        to_host(_score_rows(graphdef, state, to_device(dummy, mesh, process_local=False), chunk_size=chunk_size,
                            **scan))
    return len(seen)


def _score_pairs(model: nnx.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_len: int,
                 add_eos: bool, add_bos: bool, **options: Any) -> list[PairScore]:
    encoded = [encode_pair(tokenizer, p, r, max_len, add_eos=add_eos, add_bos=add_bos) for p, r in pairs]
    scores = score_encoded(model, [(e.prompt_ids, e.response_ids) for e in encoded], max_len=max_len, **options)
    return [PairScore(s, c, e.truncated) for (s, c), e in zip(scores, encoded, strict=True)]


def score_facts(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    template: str = "alpaca",
    style: str = "llamafactory-0.5.3",
    max_len: int = 1024,
    add_eos: bool = False,
    add_bos: bool = True,
    mesh: Mesh | None = None,
    progress: bool = True,
    **options: Any,
) -> list[list[PairScore]]:
    """A PairScore (log-prob, tokens, truncated, ppl) per fact of each (question, facts) item (question text as
    `templates.question_text` builds it)."""
    pairs = [(prompt_text(q, template=template, style=style), f) for q, facts in items for f in facts]
    flat = _score_pairs(model, tokenizer, pairs, max_len=max_len, add_eos=add_eos, add_bos=add_bos, mesh=mesh,
                        progress=progress, **options)
    out, i = [], 0
    for _, facts in items:
        out.append(flat[i : i + len(facts)])
        i += len(facts)
    return out


def fact_perplexities(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    template: str = "alpaca",
    max_len: int = 1024,
    mesh: Mesh | None = None,
    progress: bool = True,
    **options: Any,
) -> list[list[float]]:
    """Perplexity exp(mean NLL) of each fact given its question's prompt; NaN for a fact with no tokens."""
    scores = score_facts(model, tokenizer, items, template=template, max_len=max_len, mesh=mesh, progress=progress,
                         **options)
    return [[s.ppl for s in row] for row in scores]


def sequence_logprobs(
    model: nnx.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_len: int = 1024,
    add_bos: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
    **options: Any,
) -> list[tuple[float, int]]:
    """(summed response log-prob incl. EOS, response token count) per (templated prompt, response) pair."""
    scores = _score_pairs(model, tokenizer, pairs, max_len=max_len, add_eos=True, add_bos=add_bos, mesh=mesh,
                          progress=progress, **options)
    return [(s.logprob, s.n_tokens) for s in scores]
