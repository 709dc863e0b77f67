"""The one packer (token segments -> fixed-length rows of arrays) and the one bucket policy (row lengths).

Used by SFT/DPO data (`data.pipeline`), fact scoring (`scoring`), generation prompts (`generate`) and the world's
LM pretraining (`world.pretrain.pack_rows`):

- `Bins` places items first-fit into bins of `capacity` tokens (optionally at most `max_bins` bins, at most
  `max_weight` weight per bin, or only the newest bin open: next-fit).
- `PrefixRows` packs SFT examples first-fit into rows that hold their common prompt prefix (the template's
  preamble) once, each example a segment attending to it (`data.share_prompt_prefix`).
- `pack_arrays` lays rows of `Segment`s and `Group`s out as a `SeqBatch` (+ attention group ids). A `Group` is a
  shared prefix followed by segments that each attend to the prefix and to themselves only (prefix-shared
  scoring); the positions of a group's segments continue after the prefix. Segment ids count the row's segments
  1, 2, ... (0 = padding and shared prefixes); group ids count its groups (a bare segment is its own group).
- `preference_rows` lays out one prompt's chosen answer and its rejected answers as `PairRow`s (shared prompt,
  sibling answers; a pair whose group exceeds `max_len` falls back to two plain segments); `fit_pair_rows` picks a
  batch's row length (the bucket of its longest row) and puts several such rows into one where they fit (each
  keeps its own attention groups); `pack_pair_rows` turns them into a `GroupedPreferenceBatch`.
- `bucket_length` rounds a row length up to a bucket: configured sizes or powers of two, capped at `max_len`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kt_jax.data.batch import GroupedPreferenceBatch, PairRow, SeqBatch


class Segment(NamedTuple):
    """Token ids of one packed sequence; its last `n_loss` next-token targets count in the loss."""

    tokens: Sequence[int]
    n_loss: int

    @classmethod
    def response(cls, ids: Sequence[int], prompt_len: int) -> Segment:
        """Prompt + response ids: the loss covers the response tokens (EOS included)."""
        return cls(ids, len(ids) - prompt_len)

    @classmethod
    def lm(cls, ids: Sequence[int]) -> Segment:
        """A document: the loss covers every next token."""
        return cls(ids, len(ids) - 1)


class Group(NamedTuple):
    """A shared prefix (attended by every segment of the group, scored nowhere) and its segments."""

    prefix: Sequence[int]
    segments: Sequence[Segment]

    @property
    def length(self) -> int:
        """Tokens in the group."""
        return len(self.prefix) + sum(len(s.tokens) for s in self.segments)


class Packed(NamedTuple):
    """Rows laid out as arrays: the batch and the attention group ids [N, T] (0 = padding)."""

    batch: SeqBatch
    group_ids: np.ndarray


class Bins:
    """First-fit bin packing of items of known size into bins of `capacity` tokens.

    `max_bins` bounds how many bins open (an item that fits none is refused); `max_weight` bounds the summed
    weight of a bin; `last_only` considers only the newest bin (next-fit). When bins are unbounded an item larger
    than `capacity` gets a bin of its own.
    """

    def __init__(self, capacity: int, *, max_bins: int | None = None, max_weight: int | None = None,
                 last_only: bool = False) -> None:
        self.capacity, self.max_bins, self.max_weight, self.last_only = capacity, max_bins, max_weight, last_only
        self.bins: list[list[Any]] = []
        self._used: list[tuple[int, int]] = []  # (tokens, weight) per bin

    def add(self, item: Any, size: int, weight: int = 1) -> bool:
        """Put `item` into the first bin it fits, opening a new bin if needed; False when it is refused."""
        start = len(self.bins) - 1 if self.last_only else 0
        for i in range(max(start, 0), len(self.bins)):
            tokens, w = self._used[i]
            if tokens + size <= self.capacity and (self.max_weight is None or w + weight <= self.max_weight):
                self.bins[i].append(item)
                self._used[i] = (tokens + size, w + weight)
                return True
        if self.max_bins is not None and (len(self.bins) >= self.max_bins or size > self.capacity):
            return False
        self.bins.append([item])
        self._used.append((size, weight))
        return True


class PrefixRows:
    """First-fit of SFT examples into at most `max_rows` rows of `capacity` tokens, sharing a prompt prefix.

    An example whose ids start with `prefix` (and whose prompt goes past it) costs its tokens after the prefix,
    plus the prefix once for the first such example of a row; its segment then attends to that one copy (a
    `Group`), exactly as its unpacked sequence attends to its own prefix. Other examples are plain segments.
    """

    def __init__(self, prefix: Sequence[int], capacity: int, max_rows: int) -> None:
        self.prefix, self.capacity, self.max_rows = tuple(prefix), capacity, max_rows
        self._shared: list[list[Segment]] = []
        self._plain: list[list[Segment]] = []
        self._used: list[int] = []

    def add(self, ids: Sequence[int], prompt_len: int) -> bool:
        """Place one example (ids = prompt + response); False when no row has room and no row can open."""
        k = len(self.prefix)
        shared = 0 < k < prompt_len and tuple(ids[:k]) == self.prefix
        seg = Segment(ids[k:] if shared else ids, len(ids) - prompt_len)
        for r in range(len(self._used)):
            cost = len(seg.tokens) + (k if shared and not self._shared[r] else 0)
            if self._used[r] + cost <= self.capacity:
                (self._shared if shared else self._plain)[r].append(seg)
                self._used[r] += cost
                return True
        if len(self._used) >= self.max_rows:
            return False
        self._shared.append([seg] if shared else [])
        self._plain.append([] if shared else [seg])
        self._used.append(len(ids))
        return True

    def rows(self) -> list[list[Segment | Group]]:
        """Each row's items: its shared group (prefix + segments) first, then its plain segments."""
        return [([Group(self.prefix, shared)] if shared else []) + plain
                for shared, plain in zip(self._shared, self._plain, strict=True)]


def pack_arrays(rows: Sequence[Sequence[Segment | Group]], length: int) -> Packed:
    """[len(rows), length] arrays for rows of segments and groups, laid out left to right, zero-padded."""
    n = len(rows)
    ints = lambda: np.zeros((n, length), np.int32)
    ids, targets, positions, segments, groups = ints(), ints(), ints(), ints(), ints()
    loss_mask = np.zeros((n, length), np.float32)
    for r, row in enumerate(rows):
        t = seg = 0
        for g, item in enumerate(row, start=1):
            prefix, members = (item.prefix, item.segments) if isinstance(item, Group) else ((), (item,))
            p = len(prefix)
            if p:
                ids[r, t:t + p], positions[r, t:t + p], groups[r, t:t + p] = prefix, np.arange(p), g
                t += p
            for s in members:
                m = len(s.tokens)
                seg += 1
                sl = slice(t, t + m)
                ids[r, sl], positions[r, sl], segments[r, sl], groups[r, sl] = s.tokens, p + np.arange(m), seg, g
                targets[r, t:t + m - 1] = s.tokens[1:]
                loss_mask[r, t + m - 1 - min(s.n_loss, m - 1):t + m - 1] = 1.0
                t += m
    return Packed(SeqBatch(ids, targets, loss_mask, positions, segments), groups)


Rejected = tuple[Sequence[int], float, float]  # (response ids, reference chosen, reference rejected log-prob)


def preference_rows(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[Rejected], max_len: int,
                    max_pairs: int) -> list[PairRow]:
    """Rows for a prompt, its chosen response and (response, ref chosen, ref rejected) per rejected answer.

    A row shares the prompt but its last token as a prefix; every answer is a segment starting with that last
    token, so each answer sees the prompt at the positions and with the targets of its own unpacked sequence.
    A row holds at most `max_pairs` pairs and `max_len` tokens; a pair that cannot share within `max_len` gets a
    row of its own with two plain prompt + answer segments (the per-pair layout, up to 2 * max_len tokens).
    """
    p, c = len(prompt), len(chosen)
    rows: list[PairRow] = []
    cur: list[Rejected] = []

    def flush() -> None:
        last = list(prompt[-1:])
        segs = [Segment(last + list(chosen), c)] + [Segment(last + list(r), len(r)) for r, _, _ in cur]
        pairs = tuple((1, k + 2, rc, rr) for k, (_, rc, rr) in enumerate(cur))
        rows.append(PairRow((Group(prompt[:-1], segs),), pairs, p + c + sum(1 + len(r) for r, _, _ in cur)))
        cur.clear()

    for r, rc, rr in rejected:
        used = p + c + sum(1 + len(x) for x, _, _ in cur)
        if cur and (len(cur) >= max_pairs or used + 1 + len(r) > max_len):
            flush()
        if p and p + c + 1 + len(r) <= max_len:
            cur.append((r, rc, rr))
            continue
        items = (Segment.response([*prompt, *chosen], p), Segment.response([*prompt, *r], p))
        rows.append(PairRow(items, ((1, 2, rc, rr),), 2 * p + c + len(r)))
    if cur:
        flush()
    return rows


def merge_pair_rows(rows: Sequence[PairRow]) -> PairRow:
    """One row holding `rows` left to right: items concatenated (own attention groups), pair segment ids shifted."""
    items: list[Any] = []
    pairs: list[tuple[int, int, float, float]] = []
    for row in rows:
        shift = sum(len(it.segments) if isinstance(it, Group) else 1 for it in items)
        pairs += [(c + shift, r + shift, rc, rr) for c, r, rc, rr in row.pairs]
        items += row.items
    return PairRow(tuple(items), tuple(pairs), sum(row.length for row in rows))


def fit_pair_rows(rows: Sequence[PairRow], max_len: int, sizes: Sequence[int] | None, slots: int
                  ) -> tuple[int, list[PairRow]]:
    """(row length, rows): the bucket of the longest row, and `rows` merged first-fit (longest first) into as few
    rows of that length, holding at most `slots` pairs each (a row of more pairs stays alone), as that finds.

    The length is capped at `max_len`, or at 2 * `max_len` when a per-pair fallback row is longer than `max_len`.
    """
    longest = max(row.length for row in rows)
    length = bucket_length(longest, max_len if longest <= max_len else 2 * max_len, sizes)
    bins = Bins(length, max_weight=slots)
    for i in sorted(range(len(rows)), key=lambda i: -rows[i].length):  # stable: ties keep stream order
        bins.add(rows[i], rows[i].length, len(rows[i].pairs))  # a row alone always fits: length >= longest
    return length, [merge_pair_rows(b) for b in bins.bins]


def pack_pair_rows(rows: Sequence[PairRow | None], length: int, slots: int) -> GroupedPreferenceBatch:
    """A grouped preference batch of `rows` (None = a padding row) laid out `length` long with `slots` pair slots."""
    packed = pack_arrays([row.items if row is not None else [] for row in rows], length)
    n = len(rows)
    chosen, rejected = np.zeros((n, slots), np.int32), np.zeros((n, slots), np.int32)
    ref_c, ref_r = np.zeros((n, slots), np.float32), np.zeros((n, slots), np.float32)
    for b, row in enumerate(rows):
        for k, (cs, rs, rc, rr) in enumerate(row.pairs if row is not None else ()):
            chosen[b, k], rejected[b, k], ref_c[b, k], ref_r[b, k] = cs, rs, rc, rr
    return GroupedPreferenceBatch(packed.batch, packed.group_ids, chosen, rejected, ref_c, ref_r)


def power_of_two_at_least(length: int, smallest: int) -> int:
    """The smallest power of two >= `length`, and at least `smallest`."""
    return max(smallest, 1 << max(0, length - 1).bit_length())


def bucket_length(length: int, max_len: int | None = None, sizes: Sequence[int] | None = None,
                  smallest: int = 16) -> int:
    """The padded length for rows of `length` tokens: the smallest bucket that holds them, else `max_len`.

    Buckets are `sizes` when given, else powers of two from `smallest`; buckets >= `max_len` give way to
    `max_len` itself, so a bounded policy yields only a few shapes.
    """
    if sizes is None:
        b = power_of_two_at_least(length, smallest)
        return min(b, max_len) if max_len else b
    fits = [b for b in sizes if length <= b and (max_len is None or b < max_len)]
    if not fits and max_len is None:
        raise ValueError(f"no bucket of {sorted(sizes)} holds {length} tokens")
    return min(fits) if fits else int(max_len)  # type: ignore[arg-type]


def bucket_sizes(max_len: int, smallest: int) -> list[int]:
    """Every length `bucket_length(., max_len, smallest=smallest)` can give: powers of two, then `max_len`."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return [*out, max_len]
