"""Typed batches (pytrees of arrays), encoded examples, and the task enum that picks between them.

A `SeqBatch` holds packed or padded token rows, every field [B, T] (or [A, B, T] once microbatches are
stacked): input_ids, targets (the next token of the same segment, 0 where none), loss_mask (float32, 1 where
targets[t] counts), positions (restart per segment) and segment_ids (1.. per row, 0 = padding). A
`PreferenceBatch` is one chosen and one rejected `SeqBatch` (same shape, one pair per row) plus the stored
reference log-probs [B] (NaN where a record has none; 0 on padding rows).
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


Batch = SeqBatch | PreferenceBatch
B = TypeVar("B", SeqBatch, PreferenceBatch)


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


Example = SFTExample | PreferenceExample


def seq_len(batch: Batch) -> int:
    """The longest sequence axis (the last axis of every [B, T] field) in `batch`; 0 when there is none."""
    return max((np.shape(x)[-1] for x in jax.tree.leaves(batch) if np.ndim(x) >= 2), default=0)


def pad_to(batch: B, length: int) -> B:
    """`batch` with every [B, T] field zero-padded on the right to T = `length`."""

    def pad(x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] == length:
            return x
        return np.pad(x, ((0, 0), (0, length - x.shape[1])))

    return jax.tree.map(pad, batch)


def stack(batches: Sequence[B]) -> B:
    """Host batches -> one batch of [A, B, ...] arrays (microbatches), sequence fields padded to the longest T."""
    length = max(seq_len(b) for b in batches)
    return jax.tree.map(lambda *xs: np.stack(xs), *[pad_to(b, length) for b in batches])
