"""Fact perplexities and response log-probs: length-bucketed, packed, prefix-shared, sharded, exact.

Every (prompt, response) pair is tokenized exactly as training does (`templates.encode_pair`, BOS per `add_bos`,
which callers take from the same config as training's `data.add_bos`) and scored with
the training log-prob code (`ops.logprobs.token_logprobs`, on the scored positions only: the LM head never runs on
shared prompts or padding); per-fact sums are taken in float64 on the host. Layouts (all give the same numbers):

- ``packing="shared"`` (default): pairs with the same prompt form a *group*; the prompt (all but its last token) is
  encoded once, and every response is a sibling segment ``[last prompt token, response...]`` that attends to the
  shared prompt and to itself only (block mask + positions continuing after the prompt). The last prompt token
  is repeated per sibling because it is the position that predicts each response's first token.
- ``packing="packed"``: each pair is its own segment (prompt + response), many segments per row.
- ``packing="padded"``: one pair per row (the plain baseline).

Rows are packed first-fit-decreasing (`data.packing`) into at most `pack_len` tokens and padded to the next bucket
(powers of two from 32, and `max_len`: `packing.bucket_length`), `batch_size` rows per call (rounded up to a
multiple of the mesh's batch ways), so the jitted step compiles once per bucket. Rows are sharded over the mesh's
batch axes; at most one call is in flight while the next is prepared (`sharding.Throttle`).

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
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kt_jax.data.packing import Bins, Group, Packed, Segment, bucket_length, pack_arrays
from kt_jax.data.templates import encode_pair, prompt_text
from kt_jax.errors import ConfigError
from kt_jax.model.attention import shared_prefix_mask
from kt_jax.ops.logprobs import DEFAULT_CHUNK, token_logprobs
from kt_jax.sharding import Throttle, batch_axis_size, to_device, to_host

PACKINGS = ("shared", "packed", "padded")
MIN_BUCKET = 32


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


@dataclasses.dataclass
class _Group:
    """Pairs sharing one prompt prefix: the prefix, each pair's segment, and the pairs' indices."""

    prefix: list[int]
    segments: list[Segment]
    keys: list[int]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s.tokens) for s in self.segments)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """Device inputs of one scoring call: rows [B, T] plus the scored positions compacted to [B, K]."""

    input_ids: Any
    positions: Any
    segment_ids: Any  # 1.. per scored segment, 0 on shared prefixes and padding
    group_ids: Any  # attention stays inside a group (a prefix and its segments); 0 = padding
    gather_idx: Any  # [B, K] positions of the scored targets
    gather_targets: Any  # [B, K]
    gather_valid: Any  # [B, K] bool


def _groups(pairs: Sequence[tuple[list[int], list[int]]], packing: str, cap: int, max_siblings: int) -> list[_Group]:
    """Split each pair into (shared prefix, segment); group segments with equal prompts (up to `cap` tokens)."""
    groups: list[_Group] = []
    by_prompt: dict[Hashable, _Group] = {}
    for key, (prompt, response) in enumerate(pairs):
        full = prompt + response
        n_scored = min(len(response), len(full) - 1) if full else 0
        if n_scored <= 0:
            continue
        split = max(len(prompt) - 1, 0) if packing == "shared" else 0
        seg = Segment(full[split:], n_scored)
        group = by_prompt.get(tuple(prompt)) if packing == "shared" else None
        if group is None or group.length + len(seg.tokens) > cap or len(group.segments) >= max_siblings:
            group = _Group(full[:split], [], [])
            groups.append(group)
            if packing == "shared":
                by_prompt[tuple(prompt)] = group
        group.segments.append(seg)
        group.keys.append(key)
    return groups


def _pack(groups: list[_Group], packing: str, pack_len: int, max_segments: int) -> list[list[_Group]]:
    """First-fit-decreasing bins of groups (one group per row when padded)."""
    order = sorted(groups, key=lambda g: (-g.length, g.keys[0]))
    if packing == "padded":
        return [[g] for g in order]
    bins = Bins(pack_len, max_weight=max_segments)
    for g in order:
        bins.add(g, g.length, weight=len(g.segments))
    return bins.bins


def _gather(packed: Packed) -> ScoreBatch:
    """Device inputs for one call: the row arrays plus the scored positions compacted to the front of [B, K].

    K is the smallest multiple of T/4 holding every row's scored positions, so the LM head runs on scored
    positions only (not on shared prompts or padding) with at most 4 shapes per bucket.
    """
    rows = packed.batch
    mask_BxT = rows.loss_mask > 0
    b, t = mask_BxT.shape
    step = max(t // 4, 1)
    k = min(t, -(-max(int(mask_BxT.sum(1).max()), 1) // step) * step)
    idx_BxK = np.zeros((b, k), np.int32)
    valid_BxK = np.zeros((b, k), bool)
    for r in range(b):
        pos = np.flatnonzero(mask_BxT[r])
        idx_BxK[r, : len(pos)], valid_BxK[r, : len(pos)] = pos, True
    return ScoreBatch(rows.input_ids, rows.positions, rows.segment_ids, packed.group_ids, idx_BxK,
                      np.take_along_axis(rows.targets, idx_BxK, axis=1), valid_BxK)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _score_rows(graphdef: Any, state: Any, batch: ScoreBatch, *, chunk_size: int) -> jax.Array:
    """Target log-probs [B, K] at the gathered scored positions (0 where invalid), prefix-sharing block mask."""
    model = nnx.merge(graphdef, state)
    allowed_BxTxT = shared_prefix_mask(batch.segment_ids, batch.group_ids)
    hidden_BxTxD = model.hidden_states(batch.input_ids, batch.positions, None, allowed_BxTxT)
    hidden_BxKxD = jnp.take_along_axis(hidden_BxTxD, batch.gather_idx[:, :, None], axis=1)
    logp_BxK = token_logprobs(hidden_BxKxD, model.lm_head_kernel(), batch.gather_targets, chunk_size=chunk_size)
    return jnp.where(batch.gather_valid, logp_BxK, 0.0)


def _batches(rows: list[list[_Group]], max_len: int, batch_size: int) -> Iterator[tuple[int, list[list[_Group]]]]:
    """(bucket length, up to batch_size rows) in bucket order; rows keep their packing order inside a bucket."""
    by_bucket: dict[int, list[list[_Group]]] = {}
    for row in rows:
        used = sum(g.length for g in row)
        by_bucket.setdefault(bucket_length(used, max_len, smallest=MIN_BUCKET), []).append(row)
    for length in sorted(by_bucket):
        chunk = by_bucket[length]
        for i in range(0, len(chunk), batch_size):
            yield length, chunk[i : i + batch_size]


@dataclasses.dataclass
class _Call:
    rows: list[list[_Group]]
    inputs: ScoreBatch  # host arrays: rows [B, T] + gathered [B, K]


def plan(
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int = 1024,
    mesh: Mesh | None = None,
    packing: str = "shared",
    batch_size: int = 8,
    pack_len: int | None = 512,
    max_segments: int = 64,
) -> list[_Call]:
    """The jitted calls `score_encoded` makes for these pairs (rows, host arrays, device inputs), in order."""
    if packing not in PACKINGS:
        raise ConfigError(f"packing={packing!r}; choose one of {PACKINGS}")
    if batch_size < 1 or max_segments < 1 or max_len < 2:
        raise ConfigError(f"batch_size={batch_size}, max_segments={max_segments}, max_len={max_len}: must be >= 1/1/2")
    for i, (p, r) in enumerate(pairs):
        if r and len(p) + len(r) > max_len:
            raise ConfigError(f"pair {i} has {len(p) + len(r)} tokens, more than max_len={max_len}")
    pack_len = min(pack_len or max_len, max_len)
    rows = _pack(_groups(pairs, packing, pack_len, max_segments), packing, pack_len, max_segments)
    ways = batch_axis_size(mesh) if mesh is not None else 1
    batch_size = -(-batch_size // ways) * ways
    calls = []
    for length, chunk in _batches(rows, max_len, batch_size):
        laid_out = [[Group(g.prefix, g.segments) for g in row] for row in chunk]
        packed = pack_arrays(laid_out + [[]] * (batch_size - len(chunk)), length)
        calls.append(_Call(chunk, _gather(packed)))
    return calls


def score_encoded(model: nnx.Module, pairs: Sequence[tuple[list[int], list[int]]], *, mesh: Mesh | None = None,
                  chunk_size: int = DEFAULT_CHUNK, progress: bool = False, **layout: Any) -> list[tuple[float, int]]:
    """(summed response log-prob, scored tokens) for already tokenized (prompt_ids, response_ids) pairs.

    `layout`: `plan`'s keywords (max_len, packing, batch_size, pack_len, max_segments): they change the rows and
    the speed, never the numbers. Each pair with a response must fit in max_len tokens. Responses with no scorable
    token give (0.0, 0).
    """
    calls = plan(pairs, mesh=mesh, **layout)
    graphdef, state = nnx.split(model)
    sums, counts = np.zeros(len(pairs)), np.zeros(len(pairs), np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(len(s.tokens) for c in calls for row in c.rows for g in row for s in g.segments)
        bar = tqdm(total=total, desc="score", unit="tok")

    def collect(logp_BxK: jax.Array, call: _Call) -> None:
        # float64 sums on the host: float32 accumulation order would depend on the row layout
        logp_BxK = to_host(logp_BxK).astype(np.float64)
        inputs = call.inputs
        seg_BxK = np.take_along_axis(inputs.segment_ids, inputs.gather_idx, axis=1) * inputs.gather_valid
        for r, row in enumerate(call.rows):
            segments = [(key, s) for g in row for key, s in zip(g.keys, g.segments, strict=True)]
            seg_sum = np.bincount(seg_BxK[r], weights=logp_BxK[r], minlength=len(segments) + 1)
            seg_count = np.bincount(seg_BxK[r], minlength=len(segments) + 1)
            for j, (key, s) in enumerate(segments, start=1):
                if int(seg_count[j]) != s.n_loss:
                    raise RuntimeError(f"pair {key}: scored {seg_count[j]} tokens, expected {s.n_loss}")
                sums[key], counts[key] = float(seg_sum[j]), s.n_loss
            if bar is not None:
                bar.update(sum(len(s.tokens) for _, s in segments))

    in_flight = Throttle(2, lambda item: collect(*item))  # one call runs while the next is prepared
    for call in calls:
        batch = to_device(call.inputs, mesh, process_local=False)
        in_flight.push((_score_rows(graphdef, state, batch, chunk_size=chunk_size), call))
    in_flight.drain()
    if bar is not None:
        bar.close()
    return [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]


def warmup(model: nnx.Module, calls: Sequence[_Call], *, mesh: Mesh | None = None,
           chunk_size: int = DEFAULT_CHUNK) -> int:
    """Compile every distinct call shape in `calls` (from `plan`) on dummy inputs; returns how many."""
    graphdef, state = nnx.split(model)
    seen: dict[tuple[tuple[int, ...], ...], ScoreBatch] = {}
    for call in calls:
        seen.setdefault(tuple(np.shape(x) for x in jax.tree.leaves(call.inputs)), call.inputs)
    for inputs in seen.values():
        dummy = jax.tree.map(np.zeros_like, inputs)
        to_host(_score_rows(graphdef, state, to_device(dummy, mesh, process_local=False), chunk_size=chunk_size))
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
