"""Typed batches (pytrees of arrays), encoded examples, and the task enum that picks between them.

A `SeqBatch` holds packed or padded token rows, every field [B, T] (or [A, B, T] once microbatches are
stacked): input_ids, targets (the next token of the same segment, 0 where none), loss_mask (float32, 1 where
targets[t] counts), positions (restart per segment) and segment_ids (1.. per row, 0 = padding). A
`PreferenceBatch` is one chosen and one rejected `SeqBatch` (same shape, one pair per row) plus the stored
reference log-probs [B] (NaN where a record has none; 0 on padding rows). A `GroupedPreferenceBatch` packs a
question's prompt, its chosen answer and its rejected answers as sibling segments of one row (`packing.Group`) and
names each pair by the segment ids of its two answers in per-row pair slots [B, K]. A `SharedPrefixBatch` holds SFT
rows whose examples share one copy of the prompt prefix they all start with (the template's preamble).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np


class Task(enum.Enum):
    """What a batch trains: SFT (response tokens), DPO (preference pairs) or LM (every next token)."""

    SFT = "sft"
    DPO = "dpo"
    LM = "lm"

    @property
    def preference(self) -> bool:
        """True when batches are `PreferenceBatch`es."""
        return self is Task.DPO


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeqBatch:
    """Token rows, every field [..., B, T]."""

    input_ids: Any  # int32
    targets: Any  # int32
    loss_mask: Any  # float32
    positions: Any  # int32
    segment_ids: Any  # int32, 0 = padding

    def as_dict(self) -> dict[str, Any]:
        """The fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """Chosen and rejected rows of the same shape plus reference log-probs [..., B]."""

    chosen: SeqBatch
    rejected: SeqBatch
    ref_chosen_logps: Any  # float32
    ref_rejected_logps: Any  # float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedPreferenceBatch:
    """Rows of prompt-sharing answers ([..., B, T] + attention group ids) and pair slots [..., B, K].

    Pair k of row b scores segment `chosen_seg[b, k]` against segment `rejected_seg[b, k]` of that row (0 = an
    empty slot); attention stays inside a group, and an answer sees the shared prompt and itself only.
    """

    seq: SeqBatch
    group_ids: Any  # int32 [B, T], 0 = padding
    chosen_seg: Any  # int32 [B, K]
    rejected_seg: Any  # int32 [B, K]
    ref_chosen_logps: Any  # float32 [B, K]
    ref_rejected_logps: Any  # float32 [B, K]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPrefixBatch:
    """SFT rows whose examples share one copy of their common prompt prefix ([..., B, T] + attention group ids).

    The prefix has segment id 0 and its group's id; each example is a segment of that group that attends to the
    prefix and to itself only, at the positions of its own unpacked sequence (`data.share_prompt_prefix`).
    """

    seq: SeqBatch
    group_ids: Any  # int32 [B, T], 0 = padding


Batch = SeqBatch | PreferenceBatch | GroupedPreferenceBatch | SharedPrefixBatch
B = TypeVar("B", SeqBatch, PreferenceBatch, GroupedPreferenceBatch, SharedPrefixBatch)


@dataclasses.dataclass(frozen=True, slots=True)
class SFTExample:
    """One encoded SFT/LM row: token ids, how many of them are the prompt, whether the response was cut."""

    ids: list[int]
    prompt_len: int
    truncated: bool

    @property
    def length(self) -> int:
        """Tokens in the row."""
        return len(self.ids)


@dataclasses.dataclass(frozen=True, slots=True)
class PreferenceExample:
    """One encoded KC pair: chosen and rejected ids (same prompt), reference log-probs (NaN when unknown)."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int
    truncated: bool
    ref_chosen: float
    ref_rejected: float

    @property
    def length(self) -> int:
        """Tokens in the longer side."""
        return max(len(self.chosen), len(self.rejected))


@dataclasses.dataclass(frozen=True, slots=True)
class PairRow:
    """One row of a grouped preference batch: its packed items (`packing.Group`/`Segment`) and its pairs.

    `pairs` holds (chosen segment id, rejected segment id, reference chosen, reference rejected) per pair.
    """

    items: tuple[Any, ...]
    pairs: tuple[tuple[int, int, float, float], ...]
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class GroupExample:
    """The encoded pairs of one (question, input, chosen) group: shared prompt, chosen and per-pair rejected."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[tuple[tuple[int, ...], float, float], ...]  # (response ids, ref chosen, ref rejected) per pair
    truncated: int  # pairs with a cut answer
    skipped: int  # pairs dropped by the over-length policy

    @property
    def pairs(self) -> int:
        """Pairs kept."""
        return len(self.rejected)


Example = SFTExample | PreferenceExample | GroupExample


def _token_fields(batch: Batch) -> Any:
    """The [B, T] part of a batch (a grouped batch's pair slots [B, K] have no sequence axis)."""
    return (batch.seq, batch.group_ids) if isinstance(batch, GroupedPreferenceBatch) else batch


def seq_len(batch: Batch) -> int:
    """The longest sequence axis (the last axis of every [B, T] field) in `batch`; 0 when there is none."""
    return max((np.shape(x)[-1] for x in jax.tree.leaves(_token_fields(batch)) if np.ndim(x) >= 2), default=0)


def rows(batch: Batch) -> int:
    """Rows (the first axis) of a host batch."""
    return int(np.shape(jax.tree.leaves(batch)[0])[0])


def pad_to(batch: B, length: int, n_rows: int | None = None) -> B:
    """`batch` with every [B, T] field zero-padded on the right to T = `length` (and with zero rows appended to
    `n_rows` rows when given: padding rows, which no loss counts)."""
    n_rows = rows(batch) if n_rows is None else n_rows

    def pad(x: Any, seq: bool) -> np.ndarray:
        x = np.asarray(x)
        widths = [(0, n_rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        if seq and x.ndim == 2:
            widths[1] = (0, length - x.shape[1])
        return x if not any(w for _, w in widths) else np.pad(x, widths)

    if isinstance(batch, GroupedPreferenceBatch):
        seq, groups = jax.tree.map(lambda x: pad(x, True), (batch.seq, batch.group_ids))
        slots = {f: pad(getattr(batch, f), False) for f in ("chosen_seg", "rejected_seg", "ref_chosen_logps",
                                                              "ref_rejected_logps")}
        return dataclasses.replace(batch, seq=seq, group_ids=groups, **slots)
    return jax.tree.map(lambda x: pad(x, True), batch)


def stack(batches: Sequence[B]) -> B:
    """Host batches -> one batch of [A, B, ...] arrays (microbatches), sequence fields padded to the longest T and
    rows to the most rows (grouped preference batches vary in rows)."""
    length, n_rows = max(seq_len(b) for b in batches), max(rows(b) for b in batches)
    return jax.tree.map(lambda *xs: np.stack(xs), *[pad_to(b, length, n_rows) for b in batches])
