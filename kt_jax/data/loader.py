"""Grain pipelines: seeded shuffle, per-process slice, tokenize, loss masks, SFT packing/padding, preference batches.

Stream: `MapDataset.range(N).shuffle(seed).repeat(num_epochs)[process_index::process_count].map(encode)` — every
epoch is a fresh permutation, and the processes' slices of it are disjoint and cover it exactly once. A
`BatchIterator` (a Grain `DatasetIterator`) pulls encoded examples by stream position and assembles fixed-shape
numpy batches of `batch_size // process_count` rows; its whole state is that position plus counters, so
`get_state`/`set_state` (and Grain's orbax `CheckpointHandler`) restore it exactly. `sharding.to_device` turns a
host batch into global `jax.Array`s sharded over the mesh's batch axes.

Batches are `data.batch.SeqBatch` (SFT, LM; `SharedPrefixBatch` with `share_prompt_prefix`) or, for DPO,
`GroupedPreferenceBatch` (`group_preferences`, the default: KC records with the same question, input and chosen
answer form one stream element; a batch carries exactly the next `batch_size` pairs of the stream, as the per-pair
layout does, splitting a group across batches where the boundary falls, laid out by `packing.preference_rows` as a
shared prompt + the chosen + up to `group_pairs` rejected answers, and by `packing.fit_pair_rows` several of those
to a row where they fit) or `PreferenceBatch` (`group_preferences` off: one pair per row, plain padding, same T).
Both layouts compute every pair's loss exactly as the other does; they give the same batches when the pair streams
agree (no shuffle, group members adjacent in the records, one process). With `shuffle` the grouped stream shuffles
questions, not pairs: a question's pairs share a batch (or two adjacent ones), each pair still once per epoch.
Reference log-probs are NaN when a record has none.
Shapes: packed rows are always `max_len` long (first-fit into the batch's rows, `packing.Bins`); padded rows use the
smallest bucket length that fits (`packing.bucket_length` over `buckets`), so jit sees only a few shapes. Grouped
rows are the bucket of the batch's longest (question) row, up to 2 * max_len when a group cannot share within
`max_len` and a pair falls back to two plain segments; their count is what the batch needs, rounded up to
`row_multiple` (at most one row per pair), so it varies between batches (`batch.stack` pads microbatches to the
most rows). With several processes every process pads to one row per pair: `sharding.to_device` needs the same
local row count on every process.
Over-length rows (`overlength`): "truncate" cuts the response (a prompt leaving no room for any response token
is skipped), "skip" drops the row, "error" raises; every truncation and skip is counted in `counts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np

from kt_jax.data.batch import (
    Batch,
    Example,
    GroupExample,
    PairRow,
    PreferenceBatch,
    PreferenceExample,
    SFTExample,
    SharedPrefixBatch,
    Task,
)
from kt_jax.data.packing import (
    Bins,
    PrefixRows,
    Segment,
    bucket_length,
    fit_pair_rows,
    pack_arrays,
    pack_pair_rows,
    preference_rows,
)
from kt_jax.data.records import KCRecord, Record
from kt_jax.data.templates import ALPACA_STYLES, alpaca_prompt, encode_pair, prompt_prefix
from kt_jax.data.tokenizer import Tokenizer
from kt_jax.errors import ConfigError, DataError


@dataclass(frozen=True)
class DataConfig:
    """How records become batches (`batch_size` is global: all processes together)."""

    max_len: int = 1024
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    pack: bool = True
    buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    overlength: str = "truncate"
    template: str = "llamafactory-0.5.3"
    num_epochs: int | None = None
    add_bos: bool = True
    # DPO: rows of a question's prompt + chosen + its rejected answers, several questions to a row where they fit
    # (each pair's loss exact; fewer tokens). With shuffle the stream shuffles questions, not pairs: a question's
    # pairs share a batch, which changes which pairs meet in a batch, not the objective; each pair is still seen
    # once per epoch. False: one chosen and one rejected row per pair, pairs shuffled one by one.
    group_preferences: bool = True
    group_pairs: int = 3  # rejected answers sharing one copy of a prompt + chosen (KC: 3 aspects per question)
    row_multiple: int = 1  # grouped rows per process are a multiple of this (the mesh's batch ways per process)
    # SFT (packed): the prompt prefix all examples share once per row (`packing.PrefixRows`; exact). Rows then hold
    # more examples: halve batch_size to keep the examples per step (docs/DESIGN.md "Speed on CPU").
    share_prompt_prefix: bool = False

    def __post_init__(self) -> None:
        if self.overlength not in ("truncate", "skip", "error"):
            raise ConfigError(f"data.overlength: {self.overlength!r} is not one of truncate | skip | error")
        if self.template not in ALPACA_STYLES:
            raise ConfigError(f"data.template: {self.template!r} is not one of {sorted(ALPACA_STYLES)}")
        if self.max_len < 2 or self.batch_size < 1:
            raise ConfigError(f"data.max_len ({self.max_len}) must be >= 2 and data.batch_size >= 1")
        if self.share_prompt_prefix and not self.pack:
            raise ConfigError("data.share_prompt_prefix needs data.pack: true (shared rows are packed rows)")
        if self.group_pairs < 1 or self.row_multiple < 1:
            raise ConfigError(f"data.group_pairs ({self.group_pairs}) and data.row_multiple ({self.row_multiple}) "
                              "must be >= 1")

    def bucket(self, length: int) -> int:
        """The padded row length for a batch whose longest row has `length` tokens."""
        return bucket_length(length, self.max_len, self.buckets)


def encode_sft(rec: Record, tok: Tokenizer, cfg: DataConfig) -> SFTExample | None:
    """One QA/KA record's ids, or None when the over-length policy skips it."""
    if isinstance(rec, KCRecord):
        raise DataError(f"SFT data got a preference (KC) record for question {rec.question[:60]!r}")
    pair = encode_pair(tok, alpaca_prompt(rec.question, rec.input, cfg.template), rec.answer, cfg.max_len,
                       add_bos=cfg.add_bos)
    if pair.truncated and (cfg.overlength != "truncate" or not pair.response_ids):
        return None
    return SFTExample(pair.prompt_ids + pair.response_ids, len(pair.prompt_ids), pair.truncated)


def encode_preference(rec: Record, tok: Tokenizer, cfg: DataConfig) -> PreferenceExample | None:
    """One KC record's chosen and rejected ids and reference log-probs, or None when skipped."""
    if not isinstance(rec, KCRecord):
        raise DataError(f"preference data got a non-KC record for question {rec.question[:60]!r}")
    prompt = alpaca_prompt(rec.question, rec.input, cfg.template)
    c = encode_pair(tok, prompt, rec.chosen, cfg.max_len, add_bos=cfg.add_bos)
    r = encode_pair(tok, prompt, rec.rejected, cfg.max_len, add_bos=cfg.add_bos)
    truncated = c.truncated or r.truncated
    if truncated and (cfg.overlength != "truncate" or not c.response_ids or not r.response_ids):
        return None
    nan = float("nan")
    ref_c = nan if rec.ref_chosen_logp is None else rec.ref_chosen_logp
    ref_r = nan if rec.ref_rejected_logp is None else rec.ref_rejected_logp
    return PreferenceExample(c.prompt_ids + c.response_ids, r.prompt_ids + r.response_ids, len(c.prompt_ids),
                             truncated, ref_c, ref_r)


def preference_groups(records: Sequence[Record]) -> list[list[int]]:
    """Record indices grouped by (question, input, chosen), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, KCRecord):
            raise DataError(f"preference data got a non-KC record for question {rec.question[:60]!r}")
        groups.setdefault((rec.question, rec.input, rec.chosen), []).append(i)
    return list(groups.values())


def encode_group(recs: Sequence[Record], tok: Tokenizer, cfg: DataConfig) -> GroupExample:
    """One group's pairs (ids exactly as `encode_preference` makes them): shared prompt, chosen, rejected answers."""
    pairs = [encode_preference(rec, tok, cfg) for rec in recs]
    kept = [p for p in pairs if p is not None]
    if not kept:
        return GroupExample((), (), (), 0, len(pairs))
    first = kept[0]
    rejected = tuple((tuple(p.rejected[p.prompt_len:]), p.ref_chosen, p.ref_rejected) for p in kept)
    return GroupExample(tuple(first.chosen[:first.prompt_len]), tuple(first.chosen[first.prompt_len:]), rejected,
                        sum(p.truncated for p in kept), len(pairs) - len(kept))


def encoder(task: Task) -> Callable[[Record, Tokenizer, DataConfig], Example | None]:
    """The record encoder of a task."""
    return encode_preference if task.preference else encode_sft


class BatchIterator(grain.DatasetIterator):
    """Fixed-shape numpy batches from an encoded example stream; state = stream position + counters."""

    def __init__(self, stream: grain.MapDataset, rows: int, cfg: DataConfig, task: Task,
                 epoch_len: int | None = None, fixed_rows: int | None = None, prefix: tuple[int, ...] = ()) -> None:
        super().__init__()
        self._stream, self._rows, self._cfg, self._task, self._prefix = stream, rows, cfg, task, prefix
        self._epoch_len = epoch_len  # a whole epoch of skipped examples in a row means nothing fits max_len
        self._fixed_rows = fixed_rows  # grouped batches: this many rows, not as many as the batch needs
        self._next = 0
        self._part = 0  # pairs of the current grouped example already in earlier batches
        self._cache: tuple[int, Any] | None = None
        self.counts = {"examples": 0, "truncated": 0, "skipped_overlength": 0}
        self.last_stream_positions: list[int] = []  # stream positions of the examples in the last batch

    def _peek(self) -> Example | None:
        if self._cache is None or self._cache[0] != self._next:
            self._cache = (self._next, self._stream[self._next])
        return self._cache[1]

    def _take(self) -> Any:
        """The next encoded example that is not skipped (None at the end of a finite stream), not yet consumed."""
        skipped = 0
        while self._next < len(self._stream):
            ex = self._peek()
            if ex is None or (isinstance(ex, GroupExample) and not ex.rejected):
                self.counts["skipped_overlength"] += 1 if ex is None else ex.skipped
                self._next += 1
                skipped += 1
                if self._epoch_len and skipped >= self._epoch_len:
                    raise DataError(f"every record is longer than data.max_len={self._cfg.max_len} tokens "
                                    "(overlength=skip): no batch can be built")
                continue
            return ex
        return None

    def _consume(self, ex: Example) -> None:
        if not self.last_stream_positions or self.last_stream_positions[-1] != self._next:
            self.last_stream_positions.append(self._next)
        if isinstance(ex, GroupExample):  # counts are per pair
            self.counts["examples"] += ex.pairs
            self.counts["skipped_overlength"] += ex.skipped
        else:
            self.counts["examples"] += 1
        self.counts["truncated"] += int(ex.truncated)
        self._next += 1
        self._part = 0

    def _segment(self, ex: SFTExample) -> Segment:
        return Segment.lm(ex.ids) if self._task is Task.LM else Segment.response(ex.ids, ex.prompt_len)

    def __next__(self) -> Batch:
        self.last_stream_positions = []
        if self._task.preference:
            return self._grouped_batch() if self._cfg.group_preferences else self._preference_batch()
        if self._prefix:
            return self._shared_batch()
        return self._packed_batch() if self._cfg.pack else self._padded_batch()

    def _shared_batch(self) -> Batch:
        rows = PrefixRows(self._prefix, self._cfg.max_len, self._rows)
        while (ex := self._take()) is not None:
            if not rows.add(ex.ids, ex.prompt_len):
                break  # the example stays first in the stream for the next batch
            self._consume(ex)
        if not self.last_stream_positions:
            raise StopIteration
        packed = pack_arrays(rows.rows() + [[]] * (self._rows - len(rows.rows())), self._cfg.max_len)
        return SharedPrefixBatch(packed.batch, packed.group_ids)

    def _packed_batch(self) -> Batch:
        bins = Bins(self._cfg.max_len, max_bins=self._rows)
        while (ex := self._take()) is not None:
            if not bins.add(self._segment(ex), ex.length):
                break  # the example stays first in the stream for the next batch
            self._consume(ex)
        if not self.last_stream_positions:
            raise StopIteration
        rows = bins.bins + [[]] * (self._rows - len(bins.bins))
        return pack_arrays(rows, self._cfg.max_len).batch

    def _padded_batch(self) -> Batch:
        rows: list[list[Segment]] = []
        while len(rows) < self._rows and (ex := self._take()) is not None:
            rows.append([self._segment(ex)])
            self._consume(ex)
        if not rows:
            raise StopIteration
        longest = max(len(row[0].tokens) for row in rows)
        return pack_arrays(rows + [[]] * (self._rows - len(rows)), self._cfg.bucket(longest)).batch

    def _preference_batch(self) -> Batch:
        pairs: list[PreferenceExample] = []
        while len(pairs) < self._rows and (ex := self._take()) is not None:
            pairs.append(ex)
            self._consume(ex)
        if not pairs:
            raise StopIteration
        pad = self._rows - len(pairs)
        length = self._cfg.bucket(max(p.length for p in pairs))
        chosen = pack_arrays([[Segment.response(p.chosen, p.prompt_len)] for p in pairs] + [[]] * pad, length)
        rejected = pack_arrays([[Segment.response(p.rejected, p.prompt_len)] for p in pairs] + [[]] * pad, length)
        refs = lambda side: np.array([getattr(p, side) for p in pairs] + [0.0] * pad, np.float32)
        return PreferenceBatch(chosen.batch, rejected.batch, refs("ref_chosen"), refs("ref_rejected"))

    def _grouped_batch(self) -> Batch:
        rows: list[PairRow] = []
        pairs = 0
        while pairs < self._rows and (ex := self._take()) is not None:
            take = ex.rejected[self._part:self._part + self._rows - pairs]
            rows.extend(preference_rows(ex.prompt, ex.chosen, take, self._cfg.max_len, self._cfg.group_pairs))
            pairs += len(take)
            if self._part + len(take) < len(ex.rejected):  # the rest of this group opens the next batch
                self._part += len(take)
                if not self.last_stream_positions or self.last_stream_positions[-1] != self._next:
                    self.last_stream_positions.append(self._next)
            else:
                self._consume(ex)
        if not rows:
            raise StopIteration
        length, rows = fit_pair_rows(rows, self._cfg.max_len, self._cfg.buckets, slots=self._rows)
        n = -(-len(rows) // self._cfg.row_multiple) * self._cfg.row_multiple if self._fixed_rows is None else (
            self._fixed_rows)
        return pack_pair_rows([*rows, *[None] * (n - len(rows))], length, self._rows)

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: stream position (and pairs of a grouped example already used) and counters."""
        return {"next": int(self._next), "part": int(self._part), **{k: int(v) for k, v in self.counts.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from `get_state` (same records, config and process layout)."""
        self._next = int(state["next"])
        self._part = int(state.get("part", 0))
        self.counts = {k: int(state[k]) for k in self.counts}
        self._cache = None


class BatchDataset(grain.IterDataset):
    """An IterDataset of host numpy batches (see `BatchIterator`)."""

    def __init__(self, stream: grain.MapDataset, rows: int, cfg: DataConfig, task: Task,
                 epoch_len: int | None = None, fixed_rows: int | None = None, prefix: tuple[int, ...] = ()) -> None:
        super().__init__()
        self._stream, self._rows, self._cfg, self._task = stream, rows, cfg, task
        self._epoch_len, self._fixed_rows, self._prefix = epoch_len, fixed_rows, prefix

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._stream, self._rows, self._cfg, self._task, self._epoch_len, self._fixed_rows,
                             self._prefix)


def _process_layout(cfg: DataConfig, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % count:
        raise ConfigError(f"data.batch_size ({cfg.batch_size}) must be a multiple of the process count ({count})")
    return index, count, cfg.batch_size // count


def make_dataset(records: Sequence[Record], tok: Tokenizer, cfg: DataConfig, *, task: Task = Task.SFT,
                 process_index: int | None = None, process_count: int | None = None) -> BatchDataset:
    """Host batches of this process's slice: SFT or LM rows (packed or padded), or DPO pairs."""
    if not records:
        raise DataError("no records to build batches from")
    index, count, rows = _process_layout(cfg, process_index, process_count)
    if task.preference and cfg.group_preferences:
        return _grouped_dataset(records, tok, cfg, task, index, count, rows)
    encode = encoder(task)
    if cfg.overlength == "error":
        def encode_fn(i: int) -> Any:
            ex = encode(records[i], tok, cfg)
            if ex is None:
                raise DataError(f"record {i} (question {records[i].question[:60]!r}): longer than max_len "
                                f"{cfg.max_len} tokens (policy overlength=error)")
            return ex
    else:
        def encode_fn(i: int) -> Any:
            return encode(records[i], tok, cfg)
    ds = grain.MapDataset.range(len(records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)[index::count].map(encode_fn)
    share = cfg.share_prompt_prefix and task is Task.SFT
    prefix = prompt_prefix(tok, cfg.template, cfg.max_len, add_bos=cfg.add_bos) if share else ()
    return BatchDataset(ds, rows, cfg, task, epoch_len=-(-len(records) // count), prefix=prefix)


def _grouped_dataset(records: Sequence[Record], tok: Tokenizer, cfg: DataConfig, task: Task, index: int, count: int,
                     rows: int) -> BatchDataset:
    """The DPO stream over (question, input, chosen) groups: one shuffled element per group."""
    groups = preference_groups(records)

    def encode_fn(g: int) -> GroupExample:
        ex = encode_group([records[i] for i in groups[g]], tok, cfg)
        if ex.skipped and cfg.overlength == "error":
            raise DataError(f"records {groups[g]} (question {records[groups[g][0]].question[:60]!r}): longer than "
                            f"max_len {cfg.max_len} tokens (policy overlength=error)")
        return ex

    ds = grain.MapDataset.range(len(groups))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)[index::count].map(encode_fn)
    # several processes: one row per pair on each (sharding.to_device needs equal local row counts)
    fixed = -(-rows // cfg.row_multiple) * cfg.row_multiple if count > 1 else None
    return BatchDataset(ds, rows, cfg, task, epoch_len=-(-len(groups) // count), fixed_rows=fixed)


def stream_example(records_len: int, cfg: DataConfig, process_index: int, process_count: int,
                   position: int) -> tuple[int, int]:
    """(epoch, record index) of a process's stream position (the same permutation the pipeline uses)."""
    ds = grain.MapDataset.range(records_len)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)[process_index::process_count]
    return (process_index + position * process_count) // records_len, int(ds[position])


def length_report(records: Sequence[Record], tok: Tokenizer, cfg: DataConfig, *, task: Task = Task.SFT
                  ) -> dict[str, float]:
    """Token-length statistics of all records under `cfg` (rows, truncated, skipped, mean/max length, tokens)."""
    encode = encoder(task)
    lengths, truncated, skipped = [], 0, 0
    for rec in records:
        ex = encode(rec, tok, cfg)
        if ex is None:
            skipped += 1
            continue
        truncated += int(ex.truncated)
        lengths.append(ex.length)
    total = int(np.sum(lengths)) if lengths else 0
    return {"rows": len(records), "truncated": truncated, "skipped_overlength": skipped,
            "mean_len": total / max(len(lengths), 1), "max_len": max(lengths, default=0), "tokens": total,
            "min_packed_rows": math.ceil(total / cfg.max_len)}
