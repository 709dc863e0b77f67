"""Grain pipelines: seeded shuffle, per-process slice, tokenize, loss masks, SFT packing/padding, preference batches.

Stream: `MapDataset.range(N).shuffle(seed).repeat(num_epochs)[process_index::process_count].map(encode)` — every
epoch is a fresh permutation, and the processes' slices of it are disjoint and cover it exactly once. A
`BatchIterator` (a Grain `DatasetIterator`) pulls encoded examples by stream position and assembles fixed-shape
numpy batches of `batch_size // process_count` rows; its whole state is that position plus counters, so
`get_state`/`set_state` (and Grain's orbax `CheckpointHandler`) restore it exactly. `DeviceIterator` turns each
host batch into global `jax.Array`s sharded over the mesh's batch axes (`jax.make_array_from_process_local_data`).

Batch fields (INTERFACES.md), all [B, T]: input_ids, targets (next token of the same segment, 0 where none),
loss_mask (1 where targets[t] is a response token, EOS included), positions (restart per segment), segment_ids
(0 = padding). Preference batches: those fields prefixed chosen_/rejected_ (one pair per row, plain padding, same
T) plus ref_chosen_logps / ref_rejected_logps [B] (NaN when a record has none). Shapes: packed rows are always
`max_len` long; padded rows use the smallest bucket length that fits, so jit sees only a few shapes.
Over-length rows (`overlength`): "truncate" cuts the response (a prompt leaving no room for any response token
is skipped), "skip" drops the row, "error" raises; every truncation and skip is counted in `counts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np

from kt_jax.data.records import KCRecord, Record
from kt_jax.data.templates import ALPACA_STYLES, alpaca_prompt, encode_pair
from kt_jax.data.tokenizer import Tokenizer
from kt_jax.errors import ConfigError, DataError
from kt_jax.sharding import ShardingRules, batch_axis_size, batch_sharding

SFT_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


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

    def __post_init__(self) -> None:
        if self.overlength not in ("truncate", "skip", "error"):
            raise ConfigError(f"data.overlength: {self.overlength!r} is not one of truncate | skip | error")
        if self.template not in ALPACA_STYLES:
            raise ConfigError(f"data.template: {self.template!r} is not one of {sorted(ALPACA_STYLES)}")
        if self.max_len < 2 or self.batch_size < 1:
            raise ConfigError(f"data.max_len ({self.max_len}) must be >= 2 and data.batch_size >= 1")

    def bucket(self, length: int) -> int:
        """The padded row length for a batch whose longest row has `length` tokens."""
        return min([b for b in self.buckets if length <= b < self.max_len] + [self.max_len])


def encode_sft(rec: Record, tok: Tokenizer, cfg: DataConfig) -> tuple[list[int], int, bool] | None:
    """(ids, prompt_len, truncated) of one QA/KA record, or None when the over-length policy skips it."""
    if isinstance(rec, KCRecord):
        raise DataError(f"SFT data got a preference (KC) record for question {rec.question[:60]!r}")
    pair = encode_pair(tok, alpaca_prompt(rec.question, rec.input, cfg.template), rec.answer, cfg.max_len,
                       add_bos=cfg.add_bos)
    if pair.truncated and (cfg.overlength != "truncate" or not pair.response_ids):
        return None
    return pair.prompt_ids + pair.response_ids, len(pair.prompt_ids), pair.truncated


def encode_preference(rec: Record, tok: Tokenizer, cfg: DataConfig) -> tuple[Any, ...] | None:
    """(chosen ids, rejected ids, prompt_len, truncated, ref_c, ref_r) of one KC record, or None when skipped."""
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
    return c.prompt_ids + c.response_ids, r.prompt_ids + r.response_ids, len(c.prompt_ids), truncated, ref_c, ref_r


def segment_fields(rows: Sequence[Sequence[tuple[Sequence[int], int]]], length: int) -> dict[str, np.ndarray]:
    """SFT fields [len(rows), length] for rows of packed segments, each segment (token ids, prompt length)."""
    out = {k: np.zeros((len(rows), length), np.float32 if k == "loss_mask" else np.int32) for k in SFT_FIELDS}
    for b, row in enumerate(rows):
        offset = 0
        for s, (ids, prompt_len) in enumerate(row, start=1):
            n = len(ids)
            sl = slice(offset, offset + n)
            out["input_ids"][b, sl] = ids
            out["targets"][b, offset:offset + n - 1] = ids[1:]
            out["loss_mask"][b, offset + prompt_len - 1:offset + n - 1] = 1.0  # predicts response tokens + EOS
            out["positions"][b, sl] = np.arange(n)
            out["segment_ids"][b, sl] = s
            offset += n
    return out


class BatchIterator(grain.DatasetIterator):
    """Fixed-shape numpy batches from an encoded example stream; state = stream position + counters."""

    def __init__(self, stream: grain.MapDataset, rows: int, cfg: DataConfig, preference: bool,
                 epoch_len: int | None = None) -> None:
        super().__init__()
        self._stream, self._rows, self._cfg, self._pref = stream, rows, cfg, preference
        self._epoch_len = epoch_len  # a whole epoch of skipped examples in a row means nothing fits max_len
        self._next = 0
        self._cache: tuple[int, Any] | None = None
        self.counts = {"examples": 0, "truncated": 0, "skipped_overlength": 0}
        self.last_stream_positions: list[int] = []  # stream positions of the examples in the last batch

    def _peek(self) -> Any:
        if self._cache is None or self._cache[0] != self._next:
            self._cache = (self._next, self._stream[self._next])
        return self._cache[1]

    def _take(self) -> Any:
        """The next non-skipped encoded example (None at the end of a finite stream); advances the position."""
        skipped = 0
        while self._next < len(self._stream):
            ex = self._peek()
            if ex is None:
                self.counts["skipped_overlength"] += 1
                self._next += 1
                skipped += 1
                if self._epoch_len and skipped >= self._epoch_len:
                    raise DataError(f"every record is longer than data.max_len={self._cfg.max_len} tokens "
                                    "(overlength=skip): no batch can be built")
                continue
            return ex
        return None

    def _consume(self, ex: Any) -> None:
        self.last_stream_positions.append(self._next)
        self.counts["examples"] += 1
        self.counts["truncated"] += int(ex[3] if self._pref else ex[2])
        self._next += 1

    def __next__(self) -> dict[str, np.ndarray]:
        self.last_stream_positions = []
        if self._pref:
            return self._preference_batch()
        return self._packed_batch() if self._cfg.pack else self._padded_batch()

    def _packed_batch(self) -> dict[str, np.ndarray]:
        rows: list[list[tuple[list[int], int]]] = [[] for _ in range(self._rows)]
        fill = [0] * self._rows
        while (ex := self._take()) is not None:
            ids, prompt_len, _ = ex
            r = next((i for i in range(self._rows) if fill[i] + len(ids) <= self._cfg.max_len), None)
            if r is None:
                break  # the example stays first in the stream for the next batch
            rows[r].append((ids, prompt_len))
            fill[r] += len(ids)
            self._consume(ex)
        if not self.last_stream_positions:
            raise StopIteration
        return segment_fields(rows, self._cfg.max_len)

    def _padded_batch(self) -> dict[str, np.ndarray]:
        rows: list[list[tuple[list[int], int]]] = []
        while len(rows) < self._rows and (ex := self._take()) is not None:
            rows.append([(ex[0], ex[1])])
            self._consume(ex)
        if not rows:
            raise StopIteration
        longest = max(len(row[0][0]) for row in rows)
        return segment_fields(rows + [[]] * (self._rows - len(rows)), self._cfg.bucket(longest))

    def _preference_batch(self) -> dict[str, np.ndarray]:
        pairs = []
        while len(pairs) < self._rows and (ex := self._take()) is not None:
            pairs.append(ex)
            self._consume(ex)
        if not pairs:
            raise StopIteration
        pad = self._rows - len(pairs)
        length = self._cfg.bucket(max(max(len(p[0]), len(p[1])) for p in pairs))
        batch: dict[str, np.ndarray] = {}
        for side, k in (("chosen", 0), ("rejected", 1)):
            fields = segment_fields([[(p[k], p[2])] for p in pairs] + [[]] * pad, length)
            batch.update({f"{side}_{name}": v for name, v in fields.items()})
        batch["ref_chosen_logps"] = np.array([p[4] for p in pairs] + [0.0] * pad, np.float32)
        batch["ref_rejected_logps"] = np.array([p[5] for p in pairs] + [0.0] * pad, np.float32)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: stream position and counters."""
        return {"next": int(self._next), **{k: int(v) for k, v in self.counts.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from `get_state` (same records, config and process layout)."""
        self._next = int(state["next"])
        self.counts = {k: int(state[k]) for k in self.counts}
        self._cache = None


class BatchDataset(grain.IterDataset):
    """An IterDataset of host numpy batches (see `BatchIterator`)."""

    def __init__(self, stream: grain.MapDataset, rows: int, cfg: DataConfig, preference: bool,
                 epoch_len: int | None = None) -> None:
        super().__init__()
        self._stream, self._rows, self._cfg, self._pref = stream, rows, cfg, preference
        self._epoch_len = epoch_len

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._stream, self._rows, self._cfg, self._pref, self._epoch_len)


def _process_layout(cfg: DataConfig, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % count:
        raise ConfigError(f"data.batch_size ({cfg.batch_size}) must be a multiple of the process count ({count})")
    return index, count, cfg.batch_size // count


def make_dataset(records: Sequence[Record], tok: Tokenizer, cfg: DataConfig, *, preference: bool = False,
                 process_index: int | None = None, process_count: int | None = None) -> BatchDataset:
    """Host batches of this process's slice: SFT (packed or padded) or, with `preference=True`, KC pairs."""
    if not records:
        raise DataError("no records to build batches from")
    index, count, rows = _process_layout(cfg, process_index, process_count)
    encode = encode_preference if preference else encode_sft
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
    return BatchDataset(ds, rows, cfg, preference, epoch_len=-(-len(records) // count))


def stream_example(records_len: int, cfg: DataConfig, process_index: int, process_count: int,
                   position: int) -> tuple[int, int]:
    """(epoch, record index) of a process's stream position (the same permutation the pipeline uses)."""
    ds = grain.MapDataset.range(records_len)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)[process_index::process_count]
    return (process_index + position * process_count) // records_len, int(ds[position])


def _agree_length(length: int) -> int:
    """The longest row length over all processes (padded batches must have one global shape)."""
    if jax.process_count() == 1:
        return length
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([length], np.int32))))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              rules: ShardingRules | None = None) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows, sharded over the mesh's batch axes."""
    rows = next(iter(batch.values())).shape[0] * jax.process_count()
    if rows % batch_axis_size(mesh, rules):
        raise ConfigError(f"data.batch_size ({rows}) must be a multiple of the mesh's batch axes size "
                          f"({batch_axis_size(mesh, rules)})")
    lengths = {v.shape[1] for v in batch.values() if v.ndim == 2}
    length = _agree_length(max(lengths)) if lengths else 0
    out = {}
    for name, x in batch.items():
        if x.ndim == 2 and x.shape[1] < length:
            x = np.pad(x, ((0, 0), (0, length - x.shape[1])))
        shape = (rows, *x.shape[1:])
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x, shape)
    return out


class DeviceIterator(grain.DatasetIterator):
    """Global sharded batches; checkpoint it like any Grain iterator (its state is the host iterator's)."""

    def __init__(self, parent: grain.DatasetIterator, mesh: jax.sharding.Mesh, rules: ShardingRules | None = None):
        super().__init__(parent)
        self._mesh, self._rules = mesh, rules

    def __next__(self) -> dict[str, jax.Array]:
        return to_global(next(self._parent), self._mesh, self._rules)

    def get_state(self) -> dict[str, Any]:
        """The host iterator's state."""
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the host iterator's state."""
        self._parent.set_state(state)

    @property
    def counts(self) -> dict[str, int]:
        """Examples, truncated rows and skipped over-length rows seen so far (this process)."""
        return getattr(self._parent, "counts", {})


def device_iterator(dataset: grain.IterDataset, mesh: jax.sharding.Mesh,
                    rules: ShardingRules | None = None) -> DeviceIterator:
    """An iterator of global sharded batches over `dataset`'s host batches."""
    return DeviceIterator(iter(dataset), mesh, rules)


def length_report(records: Sequence[Record], tok: Tokenizer, cfg: DataConfig, *, preference: bool = False
                  ) -> dict[str, float]:
    """Token-length statistics of all records under `cfg` (rows, truncated, skipped, mean/max length, tokens)."""
    encode = encode_preference if preference else encode_sft
    lengths, truncated, skipped = [], 0, 0
    for rec in records:
        ex = encode(rec, tok, cfg)
        if ex is None:
            skipped += 1
            continue
        truncated += int(ex[3] if preference else ex[2])
        lengths.append(max(len(ex[0]), len(ex[1])) if preference else len(ex[0]))
    total = int(np.sum(lengths)) if lengths else 0
    return {"rows": len(records), "truncated": truncated, "skipped_overlength": skipped,
            "mean_len": total / max(len(lengths), 1), "max_len": max(lengths, default=0), "tokens": total,
            "min_packed_rows": math.ceil(total / cfg.max_len)}
