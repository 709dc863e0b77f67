"""The one packer (first-fit bins, segment/group layout) and the one bucket policy; typed batches and tasks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kt_jax.data.batch import PreferenceBatch, SeqBatch, Task, pad_to, seq_len, stack
from kt_jax.data.packing import Bins, Group, Segment, bucket_length, pack_arrays


def test_segments_lay_out_targets_mask_positions_and_ids() -> None:
    packed = pack_arrays([[Segment.response([1, 5, 6, 7], 2), Segment.lm([1, 9, 2])], []], 10)
    b = packed.batch
    assert all(x.shape == (2, 10) for x in b.as_dict().values()) and b.loss_mask.dtype == np.float32
    np.testing.assert_array_equal(b.input_ids[0], [1, 5, 6, 7, 1, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(b.targets[0], [5, 6, 7, 0, 9, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.loss_mask[0], [0, 1, 1, 0, 1, 1, 0, 0, 0, 0])  # response: 6, 7; LM: all
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(packed.group_ids[0], b.segment_ids[0])  # bare segments: one group each
    assert not b.input_ids[1].any() and not packed.group_ids[1].any()  # an empty row is padding


def test_group_shares_a_prefix_positions_continue() -> None:
    packed = pack_arrays([[Group([1, 4, 4], [Segment([8, 5, 6], 2), Segment([8, 7], 1)]), Segment([3, 3], 1)]], 12)
    b = packed.batch
    np.testing.assert_array_equal(b.input_ids[0, :10], [1, 4, 4, 8, 5, 6, 8, 7, 3, 3])
    np.testing.assert_array_equal(b.positions[0, :10], [0, 1, 2, 3, 4, 5, 3, 4, 0, 1])
    np.testing.assert_array_equal(b.segment_ids[0, :10], [0, 0, 0, 1, 1, 1, 2, 2, 3, 3])  # prefix: 0
    np.testing.assert_array_equal(packed.group_ids[0, :10], [1, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(b.loss_mask[0, :10], [0, 0, 0, 1, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(b.targets[0, :10], [0, 0, 0, 5, 6, 0, 7, 0, 3, 0])


def test_bins_first_fit_next_fit_and_limits() -> None:
    sizes = [6, 5, 3, 2, 4]
    first = Bins(8)
    for i, n in enumerate(sizes):
        assert first.add(i, n)
    assert first.bins == [[0, 3], [1, 2], [4]]
    nxt = Bins(8, last_only=True)
    for i, n in enumerate(sizes):
        nxt.add(i, n)
    assert nxt.bins == [[0], [1, 2], [3, 4]]
    bounded = Bins(8, max_bins=2)
    assert [bounded.add(i, n) for i, n in enumerate(sizes)] == [True, True, True, True, False]
    assert not Bins(8, max_bins=2).add("big", 9)  # bounded bins refuse what fits nowhere
    unbounded = Bins(8)
    assert unbounded.add("big", 9) and unbounded.bins == [["big"]]  # unbounded: a bin of its own
    weighted = Bins(100, max_weight=3)
    for i, w in enumerate([2, 2, 1, 1]):
        weighted.add(i, 1, weight=w)
    assert weighted.bins == [[0, 2], [1, 3]]


def test_bucket_policy() -> None:
    assert [bucket_length(n, 1024, (128, 160, 256)) for n in (1, 128, 129, 200, 257, 1024)] == [
        128, 128, 160, 256, 1024, 1024]
    assert bucket_length(100, 128, (128, 256)) == 128  # a bucket >= max_len gives way to max_len
    assert [bucket_length(n, 300, smallest=32) for n in (1, 33, 200, 290)] == [32, 64, 256, 300]
    assert [bucket_length(n, smallest=16) for n in (1, 16, 17, 1000)] == [16, 16, 32, 1024]
    with pytest.raises(ValueError, match="no bucket"):
        bucket_length(300, None, (128, 256))


def test_typed_batches_are_pytrees_and_stack() -> None:
    a = pack_arrays([[Segment.lm([1, 2, 3])]], 4).batch
    b = pack_arrays([[Segment.lm([1, 2, 3, 4, 5, 6])]], 8).batch
    assert seq_len(a) == 4 and len(jax.tree.leaves(a)) == 5
    assert pad_to(a, 8).input_ids.shape == (1, 8) and pad_to(a, 8).input_ids[0, 3:].sum() == 0
    micro = stack([a, b])
    assert isinstance(micro, SeqBatch) and micro.segment_ids.shape == (2, 1, 8)
    pref = PreferenceBatch(a, a, np.zeros(1, np.float32), np.ones(1, np.float32))
    stacked = stack([pref, pref])
    assert stacked.chosen.input_ids.shape == (2, 1, 4) and stacked.ref_rejected_logps.shape == (2, 1)
    assert Task.DPO.preference and not Task.SFT.preference and not Task.LM.preference


def test_lm_task_batches_count_every_next_token() -> None:
    from kt_jax.data.loader import DataConfig, make_dataset
    from kt_jax.data.records import QARecord

    class Bytes:
        bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

    recs = [QARecord("Q0?", "ab"), QARecord("Q1?", "xyz")]
    cfg = DataConfig(max_len=512, batch_size=1, shuffle=False, num_epochs=1)
    sft = next(iter(make_dataset(recs, Bytes(), cfg, task=Task.SFT)))
    lm = next(iter(make_dataset(recs, Bytes(), cfg, task=Task.LM)))
    jax.tree.map(np.testing.assert_array_equal, (sft.input_ids, sft.targets, sft.segment_ids),
                 (lm.input_ids, lm.targets, lm.segment_ids))
    tokens = int((lm.segment_ids > 0).sum())
    assert lm.loss_mask.sum() == tokens - 2 and sft.loss_mask.sum() == len("ab") + 1 + len("xyz") + 1
