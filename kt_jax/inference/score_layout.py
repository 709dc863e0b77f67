"""How fact scoring lays (prompt, response) pairs out for the model: rows, attention windows, scored positions.

Host-side numpy only; `inference.scoring` runs what this builds. Three layouts, all giving the same numbers:

- ``shared`` (default): the prompts' common token prefix (the template's preamble, BOS included) opens each row
  once, at positions 0..p-1. Pairs with the same prompt form a *group*: the rest of the prompt but its last
  token (the question), then one sibling *segment* per response, ``[last prompt token, response...]``, whose
  positions continue after the question. The last prompt token is repeated per sibling because it is the position
  that predicts each response's first token. Each group is one attention window: its queries see the preamble,
  their question (causally) and their own segment, exactly the keys of their unpacked sequence.
- ``packed``: each pair is its own window (prompt + response), many per row; nothing is shared.
- ``padded``: one pair per row, padded (the plain baseline).

Rows hold groups next-fit in decreasing length, so a call's groups have similar lengths and its windows, all
`Q` query slots long (the call's longest group, rounded up the `ladder`), waste little. Attention then costs each
window's Q x (preamble + Q) scores instead of a row's T x T (`model.attention.AttentionWindows`). The LM head runs
only on the scored positions, gathered to the front of each row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kt_jax.data.packing import Segment, bucket_length
from kt_jax.model.attention import AttentionWindows

PACKINGS = ("shared", "packed", "padded")
MIN_BUCKET = 32  # the shortest padded row
# Call shapes are rounded up to a few sizes, so a scoring pass compiles a handful of programs, and later passes over
# similar data (the next stage, the next seed) find them in the compile cache: every distinct shape costs a trace,
# a lowering and a compile (~1-1.5 s each for the world's and the benchmark's small models on 2 cores).
QUERY_ROUND = 32  # window query and key slots: a size of `ladder(., QUERY_ROUND)`
WINDOW_ROUND = 4  # windows per row: a size of `ladder(., WINDOW_ROUND)`
SCORED_ROUND = 128  # gathered LM-head positions per row: a multiple of this and of an eighth of the row
# A question with more fact tokens than this splits into several groups (each repeats the question): a window
# costs Q x S scores, so one long group costs more attention than the extra question tokens cost matmuls.
MAX_GROUP_TOKENS = 384


@dataclasses.dataclass
class Group:
    """Pairs sharing one prompt: the prompt after the row preamble but its last token, each pair's segment, and
    the pairs' indices."""

    prefix: list[int]
    segments: list[Segment]
    keys: list[int]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s.tokens) for s in self.segments)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """Device inputs of one scoring call: rows [B, T], their attention windows, the scored positions [B, M]."""

    input_ids: Any
    positions: Any
    windows: AttentionWindows
    gather_idx: Any  # [B, M] row positions of the scored targets
    gather_targets: Any  # [B, M]
    gather_valid: Any  # [B, M] bool


@dataclasses.dataclass
class Call:
    """One jitted call: its rows of groups, the host arrays, and the pair each gathered position belongs to."""

    rows: list[list[Group]]
    inputs: ScoreBatch
    pair_keys: np.ndarray  # [B, M] pair index per gathered position, -1 where invalid

    @property
    def scored_tokens(self) -> int:
        return sum(len(s.tokens) for row in self.rows for g in row for s in g.segments)


def common_preamble(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[int]:
    """The longest token prefix every scored pair's prompt shares, leaving each prompt at least its last token."""
    prompts = [p for p, r in pairs if r]
    if not prompts:
        return []
    n = max(min(len(p) for p in prompts) - 1, 0)
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return list(first[:n])


def groups(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], packing: str, preamble: int, cap: int,
           max_siblings: int) -> list[Group]:
    """Each scored pair as a segment; in ``shared``, segments with equal prompts grouped (at most `cap` tokens and
    `max_siblings` segments a group) after the prompt's first `preamble` tokens, which the row holds."""
    out: list[Group] = []
    by_prompt: dict[tuple[int, ...], Group] = {}
    for key, (prompt, response) in enumerate(pairs):
        full = [*prompt, *response]
        n_scored = min(len(response), len(full) - 1) if full else 0
        if n_scored <= 0:
            continue
        if packing != "shared":
            out.append(Group([], [Segment(full, n_scored)], [key]))
            continue
        split = max(len(prompt) - 1, 0)
        seg = Segment(full[split:], n_scored)
        group = by_prompt.get(tuple(prompt))
        if group is None or group.length + len(seg.tokens) > cap or len(group.segments) >= max_siblings:
            group = Group(full[preamble:split], [], [])
            out.append(group)
            by_prompt[tuple(prompt)] = group
        group.segments.append(seg)
        group.keys.append(key)
    return out


def rows(groups_: Sequence[Group], packing: str, preamble: int, row_len: int) -> list[list[Group]]:
    """Groups by decreasing length, next-fit into rows of `row_len` tokens (preamble included); one a row when
    ``padded``. A group longer than a row gets a row of its own."""
    out: list[list[Group]] = []
    used = 0
    for g in sorted(groups_, key=lambda g: (-g.length, g.keys[0])):
        if out and packing != "padded" and used + g.length <= row_len:
            out[-1].append(g)
            used += g.length
        else:
            out.append([g])
            used = preamble + g.length
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ladder(n: int, smallest: int) -> int:
    """The smallest size >= n of smallest x {1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, ...} (`smallest` a power of two):
    at most 25% above n, four sizes an octave."""
    octave = smallest
    while octave * 2 < n:
        octave *= 2
    return next(octave * k // 4 for k in (4, 5, 6, 7, 8) if octave * k // 4 >= n)


def row_length(used: int, pack_len: int) -> int:
    """Padded length of rows holding at most `used` tokens: a power of two from MIN_BUCKET up to 512, then a
    multiple of 512; never below `used`."""
    return max(used, bucket_length(used, 512, smallest=MIN_BUCKET) if used <= 512 else _round_up(used, 512))


def lay_out(call_rows: Sequence[list[Group]], n_rows: int, preamble: Sequence[int], packing: str,
            pack_len: int) -> Call:
    """The host arrays of one call: `call_rows` (padded with empty rows to `n_rows`) with their windows."""
    p = len(preamble)
    lengths = [p + sum(g.length for g in row) for row in call_rows]
    longest = max(g.length for row in call_rows for g in row)
    if packing == "padded":
        t = q = row_length(longest, pack_len)
    else:
        t = min(row_length(max(lengths), pack_len), max(pack_len, max(lengths)))
        q = ladder(max(longest, p), QUERY_ROUND)
    w = max(len(row) for row in call_rows) + (1 if p else 0)
    w = w if packing == "padded" else ladder(w, WINDOW_ROUND)
    s = q if packing == "padded" else ladder(p + q, QUERY_ROUND)  # multiples of 16: aligned for the batched dots
    ids, positions, targets = (np.zeros((n_rows, t), np.int32) for _ in range(3))
    scored_key = np.full((n_rows, t), -1, np.int64)
    query_idx, key_idx = np.zeros((n_rows, w, q), np.int32), np.zeros((n_rows, w, s), np.int32)
    allowed = np.zeros((n_rows, w, q, s), bool)
    slot_idx = np.zeros((n_rows, t), np.int32)
    for r, row in enumerate(call_rows):
        window = 0
        if p:
            ids[r, :p], positions[r, :p] = preamble, np.arange(p)
            query_idx[r, 0, :p], key_idx[r, :, :p], slot_idx[r, :p] = np.arange(p), np.arange(p), np.arange(p)
            allowed[r, 0, :p, :p] = np.tri(p, dtype=bool)
            window = 1
        at = p
        for g in row:
            n = g.length
            tokens = np.concatenate([np.asarray(g.prefix, np.int32)] + [np.asarray(s.tokens, np.int32)
                                                                          for s in g.segments])
            seg_ids = np.concatenate([np.zeros(len(g.prefix), np.int32)] + [np.full(len(s.tokens), j, np.int32)
                                                                             for j, s in enumerate(g.segments, 1)])
            pos = np.concatenate([np.arange(len(g.prefix))] + [len(g.prefix) + np.arange(len(s.tokens))
                                                               for s in g.segments]) + p
            ids[r, at:at + n], positions[r, at:at + n] = tokens, pos
            query_idx[r, window, :n], key_idx[r, window, p:p + n] = at + np.arange(n), at + np.arange(n)
            slot_idx[r, at:at + n] = window * q + np.arange(n)
            own = np.tri(n, dtype=bool) & ((seg_ids[None, :] == 0) | (seg_ids[None, :] == seg_ids[:, None]))
            allowed[r, window, :n, p:p + n] = own
            allowed[r, window, :n, :p] = True
            off = at + len(g.prefix)
            for key, s in zip(g.keys, g.segments, strict=True):
                m = len(s.tokens)
                targets[r, off:off + m - 1] = s.tokens[1:]
                scored_key[r, off + m - 1 - s.n_loss:off + m - 1] = key
                off += m
            at += n
            window += 1
    scored = scored_key >= 0
    m = min(t, _round_up(max(int(scored.sum(1).max()), 1), max(SCORED_ROUND, t // 8)))
    gather_idx = np.zeros((n_rows, m), np.int32)
    pair_keys = np.full((n_rows, m), -1, np.int64)
    for r in range(n_rows):
        where = np.flatnonzero(scored[r])
        gather_idx[r, :len(where)], pair_keys[r, :len(where)] = where, scored_key[r, where]
    inputs = ScoreBatch(ids, positions, AttentionWindows(query_idx, key_idx, allowed, slot_idx), gather_idx,
                        np.take_along_axis(targets, gather_idx, axis=1), pair_keys >= 0)
    return Call(list(call_rows), inputs, pair_keys)
