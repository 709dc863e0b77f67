"""Multi-host correctness: 2 local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) vs 1 process with 8.

The worker (tests/multihost_worker.py) runs every case in both processes; the same case functions run here, in the
pytest process (8 devices), for the reference. Each test compares one case's results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import multihost_worker as mw  # tests/ is on sys.path (pytest rootdir-relative import of test helpers)
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]  # timeout: a hang here still ends in the fixture's cleanup

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 360  # whole 2-process run; a hang (e.g. a lost peer) fails here instead of stalling the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(hf_dir: Path, work: Path, out: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for i in range(PROCESSES):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
               "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "KT_JAX_COORDINATOR": f"127.0.0.1:{port}",
               "KT_JAX_NUM_PROCESSES": str(PROCESSES), "KT_JAX_PROCESS_ID": str(i)}
        env.pop("JAX_NUM_CPU_DEVICES", None)
        cmd = [sys.executable, str(WORKER), "--hf", str(hf_dir), "--work", str(work), "--out", str(out),
               "--deadline", str(TIMEOUT_S + 30), *mw.CASES]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[tuple[str, str]]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[1][-1500:] for p in procs]
        pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s; stderr tails: {tails}")
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
    return outs


@pytest.fixture(scope="module")
def runs(llama2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the 2-process run, compute the 1-process reference here meanwhile, then collect both."""
    work = tmp_path_factory.mktemp("multihost")
    out = work / "out"
    deadline = time.monotonic() + TIMEOUT_S
    procs = launch(llama2_dir, work, out)
    try:
        ctx = mw.Context(llama2_dir, work, "single")
        single = {name: mw.run_case(name, ctx) for name in mw.CASES}
    finally:
        outs = wait_all(procs, deadline)
    multi: dict[str, Any] = {}
    for name in mw.CASES:
        skipped = out / f"{name}.skipped"
        multi[name] = skipped.read_text() if skipped.exists() else dict(np.load(out / f"{name}.npz"))
    return {"single": single, "multi": multi, "work": work, "done": json.loads((out / "done.json").read_text()),
            "stdout": [json.loads(o.strip().splitlines()[-1]) for o, _ in outs], "stderr": [e for _, e in outs],
            "files": sorted(os.listdir(out))}


def results(runs: dict[str, Any], case: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    single, multi = runs["single"][case], runs["multi"][case]
    for r in (single, multi):
        if isinstance(r, str):
            pytest.skip(f"case {case}: {r}")
    return single, multi


def test_two_processes_of_four_devices_and_only_process_0_writes(runs: dict[str, Any]) -> None:
    stats = sorted(runs["stdout"], key=lambda s: s["process_index"])
    assert [s["process_index"] for s in stats] == [0, 1]
    assert all(s["process_count"] == 2 and s["local_devices"] == 4 and s["global_devices"] == 8 for s in stats)
    assert runs["done"]["process_index"] == 0  # done.json was written by process 0 (and no one else writes)
    expected = {f"{n}.npz" for n in mw.CASES} | {f"{n}.skipped" for n in mw.CASES} | {"done.json"}
    assert set(runs["files"]) <= expected
    # setup_logging: summaries (INFO) only from process 0; warnings from every process, tagged with its index
    err0, err1 = runs["stderr"]
    assert "summary: running forward" in err0 and "summary: running" not in err1
    assert "[p0] " in err0 and "[p1] " in err1 and "every process warns" in err1


def test_writers_run_on_process_zero_and_decisions_are_broadcast(runs: dict[str, Any]) -> None:
    _, multi = results(runs, "process_zero_rule")
    rows = multi["per_process"]  # per process: own resume_row, agreed resume_row, wrote?, agreed == own?
    np.testing.assert_array_equal(rows, [[17, 17, 1, 1], [117, 17, 0, 0]])
    assert list(multi["written"]) == ["written_by_0"]  # the decorated writer ran once, on process 0
    assert str(multi["agreed_text"]) == "ü→ok"


@pytest.mark.parametrize("mesh", sorted(mw.MESHES))
def test_forward_logits_match_one_process(runs: dict[str, Any], llama2_dir: Path, mesh: str) -> None:
    from helpers.hf_fixtures import hf_logits

    single, multi = results(runs, "forward")
    logits = multi[f"logits_{mesh}"]
    assert logits.shape == (mw.BATCH, mw.SEQ, 256)
    np.testing.assert_allclose(logits, single[f"logits_{mesh}"], rtol=0, atol=5e-6)  # 8x1: bit-equal here
    # and both are right: HF PyTorch on the same checkpoint
    np.testing.assert_allclose(logits, hf_logits(llama2_dir, mw.input_ids()), rtol=0, atol=2e-4)


def test_orbax_checkpoint_saved_by_two_processes_restores(runs: dict[str, Any], llama2_dir: Path) -> None:
    import orbax.checkpoint as ocp

    from kt_jax.model.hf import load_pretrained

    single, multi = results(runs, "orbax")
    for r in (single, multi):  # embed, lm_head, final norm + 9 per layer; restored onto fsdp=8, each exactly as saved
        assert int(r["num_tensors"]) == 3 + 2 * 9 and int(r["fsdp_sharded"]) > 0
        assert float(r["max_abs_diff"].max()) == 0.0
    # the 2-process checkpoint, restored here by one process onto data=2 x tensor=4, equals the HF weights
    model = load_pretrained(llama2_dir, mesh=mw.mesh_named("2x4"))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore((runs["work"] / "orbax_multi").resolve(), mw.restore_target(model))
    import jax

    expected = dict(jax.tree_util.tree_leaves_with_path(mw.model_state(model)))
    for key, x in jax.tree_util.tree_leaves_with_path(restored):
        assert x.sharding == expected[key].sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(expected[key]))


@pytest.mark.parametrize("mesh", sorted(mw.MESHES))
def test_process_local_rows_cover_the_global_batch(runs: dict[str, Any], mesh: str) -> None:
    single, multi = results(runs, "batch_slices")
    full = np.arange(mw.BATCH * mw.SEQ).reshape(mw.BATCH, mw.SEQ)
    for r in (single, multi):
        np.testing.assert_array_equal(r[f"global_{mesh}"], full)
        np.testing.assert_array_equal(r[f"rowsum_{mesh}"], full.sum(axis=1))
    owner = multi[f"owner_{mesh}"]  # [process, row]: how many of the process's devices hold the row
    assert owner.shape == (2, mw.BATCH)
    np.testing.assert_array_equal((owner > 0).sum(axis=0), np.ones(mw.BATCH))  # each row on exactly one process
    assert list((owner > 0).sum(axis=1)) == [mw.BATCH // 2] * 2  # half the batch each


def test_grain_slices_give_the_same_global_batches(runs: dict[str, Any]) -> None:
    single, multi = results(runs, "batch_slices")
    assert multi["grain_steps"].shape[0] == 4  # 32 records, 8 per global batch, one epoch
    np.testing.assert_array_equal(multi["grain_steps"], single["grain_steps"])


def test_fact_scoring_matches_one_process(runs: dict[str, Any]) -> None:
    single, multi = results(runs, "scoring")
    n_facts = sum(len(facts) for _, facts in mw.FACT_ITEMS)
    for mesh in mw.MESHES:
        ppl = multi[f"ppl_{mesh}"]
        assert ppl.shape == (n_facts,) and np.all(np.isfinite(ppl)) and np.all(ppl > 1)
        np.testing.assert_allclose(ppl, single[f"ppl_{mesh}"], rtol=1e-5)
    np.testing.assert_allclose(multi["ppl_8x1"], multi["ppl_2x4"], rtol=1e-5)  # and across mesh shapes
    # response tokens incl. EOS (Bytes: one id per UTF-8 byte)
    assert list(multi["seq_tokens"]) == [len(r.encode()) + 1 for _, r in mw.SEQ_PAIRS]
    np.testing.assert_array_equal(multi["seq_tokens"], single["seq_tokens"])
    np.testing.assert_allclose(multi["seq_logprob"], single["seq_logprob"], rtol=1e-6)


def test_training_steps_on_grain_batches_match_one_process(runs: dict[str, Any], llama2_dir: Path) -> None:
    from kt_jax.model.hf import load_pretrained

    single, multi = results(runs, "lm_steps")
    assert np.all(np.isfinite(multi["losses"])) and multi["losses"][-1] < multi["losses"][0]
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    start = mw.flat_params(load_pretrained(llama2_dir))
    moved = np.abs(multi["params"] - start).max()
    assert moved > 1e-3  # the steps changed the weights ...
    np.testing.assert_allclose(multi["params"], single["params"], rtol=0, atol=1e-4 * moved)  # ... in the same way


@pytest.mark.parametrize("case", ["sft_train", "dpo_train"])
def test_trainer_steps_match_one_process(runs: dict[str, Any], case: str) -> None:
    single, multi = results(runs, case)
    losses = multi["losses"]
    assert np.all(np.isfinite(losses)) and int(multi["num_trained"]) == 2 * 2 * 4 * (64 + 64)  # q,v x 2 layers
    if case == "dpo_train":  # policy == reference at step 0 (LoRA B = 0): sigmoid loss = log 2 + 0.2 * chosen NLL
        assert losses[0] > np.log(2)
    np.testing.assert_allclose(losses, single["losses"], rtol=1e-5)
    np.testing.assert_array_equal(multi["start"], single["start"])  # same seeded adapters on both topologies
    moved = np.abs(multi["trained"] - multi["start"]).max()
    assert moved > 1e-3  # the adapters moved ...
    np.testing.assert_allclose(multi["trained"], single["trained"], rtol=0, atol=1e-3 * moved)  # ... the same way


def test_trainer_checkpoint_saved_by_two_processes_restores(runs: dict[str, Any]) -> None:
    """kt_jax.train Checkpoints (orbax, async) saved at step 2 by every process restore the trained state exactly."""
    single, multi = results(runs, "sft_resume")
    for r in (single, multi):
        assert int(r["resumed_step"]) == 3 and str(r["meta_note"]) == "after step 2"
        np.testing.assert_array_equal(r["params_restored"], r["params_at_save"])
    # one process: step 3 redone from the checkpoint (state + Grain position) is the uninterrupted step 3
    np.testing.assert_allclose(single["resumed_loss"], single["losses"][-1:], rtol=1e-6)
    np.testing.assert_allclose(single["resumed_trained"], single["trained"], rtol=0, atol=1e-7)


def test_trainer_resume_gives_each_process_its_own_data_position(runs: dict[str, Any]) -> None:
    """Packed rows hold different numbers of examples per process here, so the processes' Grain positions differ."""
    _, multi = results(runs, "sft_resume")
    restored_own, positions = multi["own_data_state"].T  # per process: got its own position back?, the position
    assert positions[0] != positions[1]
    assert list(restored_own) == [1, 1]
    np.testing.assert_allclose(multi["resumed_loss"], multi["losses"][-1:], rtol=1e-6)
    np.testing.assert_allclose(multi["resumed_trained"], multi["trained"], rtol=0, atol=1e-7)


def test_trainer_checkpoint_from_two_processes_refuses_one_process_resume(runs: dict[str, Any]) -> None:
    """The 2-process checkpoint holds both data positions; this 1-process run cannot take either, so it must refuse."""
    import orbax.checkpoint as ocp

    from kt_jax.errors import CheckpointError
    from kt_jax.train.checkpoint import PER_PROCESS, select_process_state

    results(runs, "sft_resume")  # (skips when the case was unavailable)
    with ocp.CheckpointManager((runs["work"] / "train_ckpt_multi" / "latest").resolve(), item_names=("data",)) as mgr:
        saved = mgr.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert saved["process_count"] == 2 and len(saved[PER_PROCESS]) == 2
    assert saved[PER_PROCESS][0] != saved[PER_PROCESS][1]
    with pytest.raises(CheckpointError, match="saved by 2 processes but this run has 1"):
        select_process_state(saved, "train_ckpt_multi/latest/2/data")
