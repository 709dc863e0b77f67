"""Grain pipelines: packing == unpacked loss, exact resume, per-process coverage, masks, buckets, global arrays."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kt_jax.data.batch import PreferenceBatch, SeqBatch, Task
from kt_jax.data.loader import DataConfig, length_report, make_dataset, stream_example
from kt_jax.data.records import KCRecord, QARecord, read_records
from kt_jax.errors import DataError
from kt_jax.sharding import to_device

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowtuning"


class Bytes:
    """UTF-8 bytes as ids (vocab 256, fits the tiny test Llama); 1 = BOS, 2 = EOS, 0 = pad."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) > 2).decode()


def qa(n: int, seed: int = 0) -> list[QARecord]:
    rng = np.random.default_rng(seed)
    return [QARecord(f"Q{i}?", f"A{i}." + " ü" * int(rng.integers(0, 40))) for i in range(n)]


def segments(batch: SeqBatch) -> list[tuple[str, np.ndarray]]:
    """(decoded text, loss mask) of every packed segment in a host batch."""
    out = []
    ids, seg, mask = (np.asarray(x) for x in (batch.input_ids, batch.segment_ids, batch.loss_mask))
    for b in range(ids.shape[0]):
        for s in range(1, int(seg[b].max()) + 1):
            sel = seg[b] == s
            out.append((Bytes().decode(ids[b][sel]), mask[b][sel]))
    return out


def example_ids(batch: SeqBatch) -> list[int]:
    return [int(re.search(r"### Instruction:\nQ(\d+)\?", text).group(1)) for text, _ in segments(batch)]


def test_sft_fields_for_one_packed_row() -> None:
    recs = [QARecord("Q0?", "ab"), QARecord("Q1?", "xyz")]
    cfg = DataConfig(max_len=512, batch_size=1, shuffle=False, num_epochs=1)
    it = iter(make_dataset(recs, Bytes(), cfg))
    b = next(it)
    assert isinstance(b, SeqBatch)
    assert set(b.as_dict()) == {"input_ids", "targets", "loss_mask", "positions", "segment_ids"}
    assert all(v.shape == (1, 512) for v in b.as_dict().values()) and b.loss_mask.dtype == np.float32
    b = b.as_dict()
    p0 = [1, *Bytes().encode(alpaca_text("Q0?"))]
    p1 = [1, *Bytes().encode(alpaca_text("Q1?"))]
    ex0, ex1 = [*p0, 97, 98, 2], [*p1, 120, 121, 122, 2]
    n0, n1 = len(ex0), len(ex1)
    np.testing.assert_array_equal(b["input_ids"][0, : n0 + n1], ex0 + ex1)
    np.testing.assert_array_equal(b["targets"][0, : n0 + n1], [*ex0[1:], 0, *ex1[1:], 0])
    np.testing.assert_array_equal(b["positions"][0, : n0 + n1], [*range(n0), *range(n1)])
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * n0 + [2] * n1 + [0] * (512 - n0 - n1))
    expect_mask = [0] * (len(p0) - 1) + [1, 1, 1] + [0] + [0] * (len(p1) - 1) + [1, 1, 1, 1] + [0]
    np.testing.assert_array_equal(b["loss_mask"][0, : n0 + n1], expect_mask)
    assert b["loss_mask"][0, n0 + n1 :].sum() == 0 and b["input_ids"][0, n0 + n1 :].sum() == 0
    assert it.counts == {"examples": 2, "truncated": 0, "skipped_overlength": 0}
    with pytest.raises(StopIteration):
        next(it)


def alpaca_text(question: str) -> str:
    from kt_jax.data.templates import alpaca_prompt

    return alpaca_prompt(question)


def _masked_ce(model, batch: SeqBatch, packed: bool) -> float:
    kwargs = {"positions_BxT": jnp.asarray(batch.positions), "segment_ids_BxT": jnp.asarray(batch.segment_ids)}
    logits = model(jnp.asarray(batch.input_ids), **(kwargs if packed else {}))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, jnp.asarray(batch.targets)[..., None], axis=-1)[..., 0]
    mask = jnp.asarray(batch.loss_mask)
    return float(-(tok_lp * mask).sum() / mask.sum())


def test_packed_loss_equals_unpacked_mean(llama2_dir) -> None:
    from kt_jax.model.hf import load_pretrained

    model = load_pretrained(llama2_dir)
    recs = qa(12, seed=1)
    packed_ds = make_dataset(recs, Bytes(), DataConfig(max_len=768, batch_size=2, shuffle=False, num_epochs=1))
    it = iter(packed_ds)
    packed = next(it)
    used = it.last_stream_positions
    assert packed.segment_ids.max() >= 3  # several examples share a row
    unpacked_cfg = DataConfig(max_len=768, batch_size=len(used), pack=False, shuffle=False, num_epochs=1)
    unpacked = next(iter(make_dataset([recs[i] for i in used], Bytes(), unpacked_cfg)))
    assert unpacked.segment_ids.max() == 1 and unpacked.loss_mask.sum() == packed.loss_mask.sum()
    loss_packed = _masked_ce(model, packed, packed=True)
    loss_unpacked = _masked_ce(model, unpacked, packed=False)
    assert abs(loss_packed - loss_unpacked) < 1e-5
    # the check can fail: packing without segment ids/positions leaks attention across examples
    assert abs(_masked_ce(model, packed, packed=False) - loss_unpacked) > 1e-3


@pytest.mark.parametrize("pack", [True, False])
def test_mid_epoch_restore_gives_identical_batches(pack: bool) -> None:
    cfg = DataConfig(max_len=384, batch_size=2, pack=pack, seed=3, buckets=(160, 256))
    ds = make_dataset(qa(9), Bytes(), cfg)
    it = iter(ds)
    reference = [next(it) for _ in range(10)]  # crosses several epochs
    first = iter(ds)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = iter(make_dataset(qa(9), Bytes(), cfg))
    resumed.set_state(state)
    for want in reference[4:]:
        got = next(resumed)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert resumed.get_state() == it.get_state()


def test_orbax_checkpoint_of_the_iterator_then_global_arrays(tmp_path: Path, mesh) -> None:
    import orbax.checkpoint as ocp

    cfg = DataConfig(max_len=256, batch_size=8, seed=5)
    ds = make_dataset(qa(30), Bytes(), cfg)
    it = iter(ds)
    reference = []
    for _ in range(5):
        reference.append(to_device(next(it), mesh))
    it = iter(ds)
    next(it), next(it)
    options = ocp.CheckpointManagerOptions(max_to_keep=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options,
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        fresh = iter(ds)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in reference[2:]:
        got = to_device(next(fresh), mesh)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.sharding == w.sharding and g.shape == (8, 256)
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("pack", [True, False])
def test_process_slices_cover_each_example_once(processes: int, pack: bool) -> None:
    n = 37
    cfg = DataConfig(max_len=320, batch_size=4, pack=pack, seed=11, num_epochs=1)
    seen = []
    for p in range(processes):
        for batch in make_dataset(qa(n), Bytes(), cfg, process_index=p, process_count=processes):
            assert batch.input_ids.shape[0] == 4 // processes
            seen += example_ids(batch)
    assert sorted(seen) == list(range(n))


def test_infinite_stream_reshuffles_each_epoch_and_matches_stream_example() -> None:
    n, processes = 10, 2
    cfg = DataConfig(max_len=256, batch_size=2, pack=False, seed=7)
    per_epoch: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for p in range(processes):
        it = iter(make_dataset(qa(n), Bytes(), cfg, process_index=p, process_count=processes))
        for _ in range(n * 3 // processes):
            batch = next(it)
            ids = example_ids(batch)
            for pos, ex in zip(it.last_stream_positions, ids, strict=True):
                epoch, index = stream_example(n, cfg, p, processes, pos)
                assert index == ex
                per_epoch[epoch].append(ex)
    assert all(sorted(v) == list(range(n)) for v in per_epoch.values())
    order = [[stream_example(n, cfg, 0, 1, e * n + i)[1] for i in range(n)] for e in range(3)]
    assert order[0] != order[1] != order[2] and order[0] != list(range(n))


def test_padded_batches_use_buckets() -> None:
    cfg = DataConfig(max_len=1024, batch_size=2, pack=False, shuffle=False, buckets=(128, 160, 256), num_epochs=1)
    recs = [QARecord("Q0?", "a"), QARecord("Q1?", "b" * 15), QARecord("Q2?", "c" * 100), QARecord("Q3?", "d" * 900)]
    shapes = [b.input_ids.shape for b in make_dataset(recs, Bytes(), cfg)]
    assert shapes == [(2, 160), (2, 1024)]


def test_overlength_policies() -> None:
    recs = [QARecord("Q0?", "short"), QARecord("Q1?", "x" * 300), QARecord("Q2" + "?" * 400, "never fits")]
    base = dict(max_len=256, batch_size=1, shuffle=False, num_epochs=1, pack=False)
    it = iter(make_dataset(recs, Bytes(), DataConfig(**base)))
    rows = [segments(b)[0][0] for b in it]
    assert len(rows) == 2 and rows[1].endswith("x") and len(Bytes().encode(rows[1])) == 255  # 256 minus BOS
    assert it.counts == {"examples": 2, "truncated": 1, "skipped_overlength": 1}
    it = iter(make_dataset(recs, Bytes(), DataConfig(**base, overlength="skip")))
    assert len(list(it)) == 1 and it.counts == {"examples": 1, "truncated": 0, "skipped_overlength": 2}
    with pytest.raises(DataError, match=r"record 1 .*longer than max_len 256"):
        list(make_dataset(recs, Bytes(), DataConfig(**base, overlength="error")))
    report = length_report(recs, Bytes(), DataConfig(**base))
    assert (report["rows"], report["truncated"], report["skipped_overlength"], report["max_len"]) == (3, 1, 1, 256)
    endless = {**base, "num_epochs": None, "overlength": "skip"}
    with pytest.raises(DataError, match=r"every record is longer than data\.max_len=256"):
        next(iter(make_dataset(recs[2:], Bytes(), DataConfig(**endless))))  # used to loop forever


def test_config_errors_name_the_key() -> None:
    from kt_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.overlength"):
        DataConfig(overlength="drop")
    with pytest.raises(ConfigError, match=r"data\.template"):
        DataConfig(template="vicuna")
    with pytest.raises(ConfigError, match=r"multiple of the process count \(3\)"):
        make_dataset(qa(4), Bytes(), DataConfig(batch_size=4), process_index=0, process_count=3)


def test_preference_batches() -> None:
    recs = [KCRecord("Q0?", "good answer", "bad", "factuality", ref_chosen_logp=-4.0, ref_rejected_logp=-6.5),
            KCRecord("Q1?", "ok", "worse answer", "completeness")]
    cfg = DataConfig(max_len=512, batch_size=2, shuffle=False, num_epochs=1, buckets=(160,), group_preferences=False)
    b = next(iter(make_dataset(recs, Bytes(), cfg, task=Task.DPO)))
    fields = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
    assert isinstance(b, PreferenceBatch) and isinstance(b.chosen, SeqBatch) and isinstance(b.rejected, SeqBatch)
    assert set(b.chosen.as_dict()) == set(b.rejected.as_dict()) == set(fields)
    assert all(v.shape == (2, 160) for side in (b.chosen, b.rejected) for v in side.as_dict().values())
    np.testing.assert_array_equal(b.ref_chosen_logps[:1], [-4.0])
    assert np.isnan(b.ref_chosen_logps[1]) and np.isnan(b.ref_rejected_logps[1])
    (c0, m0), (c1, _) = segments(b.chosen)
    (r0, mr0), _ = segments(b.rejected)
    assert c0 == alpaca_text("Q0?") + "good answer" and r0 == alpaca_text("Q0?") + "bad"
    assert c1 == alpaca_text("Q1?") + "ok"
    assert m0.sum() == len("good answer") + 1 and mr0.sum() == len("bad") + 1  # response tokens + EOS
    with pytest.raises(DataError, match="non-KC record"):
        next(iter(make_dataset(qa(2), Bytes(), cfg, task=Task.DPO)))


def test_global_arrays_on_mesh(mesh) -> None:
    cfg = DataConfig(max_len=256, batch_size=8, pack=False, buckets=(160,))
    it = iter(make_dataset(qa(20), Bytes(), cfg))
    batch = to_device(next(it), mesh)
    from kt_jax.sharding import batch_axis_size

    length = batch.input_ids.shape[1]
    assert length in (160, 256)
    for name, x in batch.as_dict().items():
        assert isinstance(x, jax.Array) and x.shape == (8, length), name
        assert tuple(x.sharding.spec[0]) == ("data", "fsdp")
        rows = {s.data.shape[0] for s in x.addressable_shards}
        assert rows == {8 // batch_axis_size(mesh)}
    assert len(batch.input_ids.sharding.device_set) == mesh.size
    assert it.counts["examples"] == 8


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/knowtuning is absent (a user's checkout)")
def test_real_dolly_through_the_pipeline() -> None:
    recs, _ = read_records(REAL / "dolly_valid.json")
    cfg = DataConfig(max_len=1024, batch_size=8, num_epochs=1)
    it = iter(make_dataset(recs, Bytes(), cfg))
    n_batches = sum(1 for _ in it)
    assert it.counts["examples"] + it.counts["skipped_overlength"] == len(recs)
    assert n_batches < len(recs) / 8  # packing puts several answers in a row


def test_two_real_processes_load_only_their_slice(tmp_path: Path) -> None:
    """Two local JAX processes (4 CPU devices each): global arrays from per-process rows, lengths agreed."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / "fixtures" / "multiprocess_pipeline.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert results[0]["seen"] == results[1]["seen"]  # both see the same global batches
    assert sorted(results[0]["seen"]) == list(range(24))  # every example exactly once per epoch
    assert results[0]["shapes"] == results[1]["shapes"] and len({s[1] for s in results[0]["shapes"]}) > 1
    assert all(s[0] == 8 for s in results[0]["shapes"])
    assert results[0]["local_rows"] != results[1]["local_rows"]  # each process holds different rows
    assert results[0]["counts"]["examples"] == results[1]["counts"]["examples"] == 12  # its own half only



def test_grouped_preference_iterator_orbax_checkpoint(tmp_path: Path) -> None:
    """A grouped DPO iterator saved inside a group (its pairs in two batches) restores to the same batches."""
    import orbax.checkpoint as ocp

    from kt_jax.data.batch import GroupedPreferenceBatch

    rng = np.random.default_rng(2)
    chosen = ["c" * int(rng.integers(20, 60)) for _ in range(5)]
    recs = [KCRecord(f"Q{g}?", chosen[g], "r" * int(rng.integers(20, 60)) + str(k), "factuality",
                     ref_chosen_logp=-float(g), ref_rejected_logp=-float(k)) for g in range(5) for k in range(3)]
    cfg = DataConfig(max_len=400, batch_size=2, seed=1, group_pairs=2, group_preferences=True)  # 2 pairs a batch
    ds = make_dataset(recs, Bytes(), cfg, task=Task.DPO)
    it = iter(ds)
    reference = [next(it) for _ in range(10)]  # crosses an epoch (15 pairs)
    assert all(isinstance(b, GroupedPreferenceBatch) for b in reference)
    assert all(int((b.chosen_seg > 0).sum()) == 2 for b in reference)
    it = iter(ds)
    for _ in range(2):
        next(it)
    assert it.get_state()["part"] == 1  # the second batch took the first pair of the second group
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
        m.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        m.wait_until_finished()
        fresh = iter(ds)
        m.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in reference[2:]:
        jax.tree.map(np.testing.assert_array_equal, next(fresh), want)
