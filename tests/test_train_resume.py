"""Checkpoints: SIGKILL + resume is bit-identical, restore onto another mesh; `kt-jax sft/dpo` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from helpers.hf_fixtures import make_hf_llama

from kt_jax.cli import main
from kt_jax.data.records import KCRecord, QARecord, write_records
from kt_jax.data.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.timeout(600)
WORDS = ["red", "blue", "green", "river", "castle", "queen", "king", "water", "stone", "fire", "north", "south",
         "old", "new", "city", "bridge"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 300-token BPE, a tiny random Llama over it, 60 QA rows and 40 KC rows."""
    root = tmp_path_factory.mktemp("train_world")
    rng = np.random.default_rng(0)
    sent = lambda n: " ".join(rng.choice(WORDS, n)) + "."
    qa = [QARecord(f"What is {sent(2)}?", sent(int(rng.integers(3, 9)))) for _ in range(60)]
    kc = [KCRecord(f"Tell me {sent(2)}", sent(5), sent(4)) for _ in range(40)]
    corpus = Path(__file__).parent / "fixtures" / "corpus.txt"
    tok = train_bpe_tokenizer([corpus.read_text(), *(r.question + r.answer for r in qa)], 300, root / "tok")
    model = make_hf_llama(root / "model", seed=3, vocab_size=320)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).write_bytes((root / "tok" / name).read_bytes())
    write_records(root / "qa.jsonl", qa)
    write_records(root / "kc.jsonl", kc)
    assert tok.vocab_size <= 320
    return root


def _config(world: Path, out: Path, **extra) -> Path:
    cfg = {"model": str(world / "model"), "train_file": str(world / "qa.jsonl"), "output_dir": str(out),
           "kind": "qa", "finetuning": "full",
           "data": {"max_len": 192, "batch_size": 8, "pack": True, "seed": 1},
           "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
           "train": {"num_steps": 8, "eval_rows": 6, "eval_every_frac": 0.25, "save_every": 2,
                     "compute_dtype": "float32", "progress": False, "tensorboard": False, "chunk_size": 16},
           "mesh": {"data": 2, "fsdp": 4, "tensor": 1}}
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from kt_jax.config import load_config
    from kt_jax.train.job import TrainJobConfig, run_training
    kill_at = int(sys.argv[2])
    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    run_training(load_config(TrainJobConfig, sys.argv[1]), on_step=on_step)
""")


def _params(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "latest" / str(step) / "params")
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(world, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ref = _config(world, tmp_path / "ref")
    subprocess.run([sys.executable, str(script), str(ref), "0"], check=True, env=env, timeout=300)
    cut = _config(world, tmp_path / "cut")
    killed = subprocess.run([sys.executable, str(script), str(cut), "5"], env=env, timeout=300)
    assert killed.returncode == -9
    saved = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert saved and max(saved) <= 4  # killed after step 5, before the step-6 checkpoint
    subprocess.run([sys.executable, str(script), str(cut), "0"], check=True, env=env, timeout=300)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_from"] == max(saved) and summary["steps"] == 8
    a, b = _params(tmp_path / "ref", 8), _params(tmp_path / "cut", 8)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
    from safetensors.numpy import load_file

    init = load_file(world / "model" / "model.safetensors")["lm_head.weight"].T
    assert np.abs(a["['lm_head']['kernel']"] - init).max() > 1e-4  # training moved the weights
    train_lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_lines if r["split"] == "train"] == list(range(1, 9))


def test_restore_onto_another_mesh(tmp_path):
    from flax import nnx

    from kt_jax.model.llama import Llama, LlamaConfig
    from kt_jax.sharding import make_mesh, state_shardings
    from kt_jax.train.checkpoint import Checkpoints
    from kt_jax.train.config import OptimConfig
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4)
    tx = make_optimizer(OptimConfig(), 10)
    states = []
    for seed, shape in ((0, (1, 8, 1)), (1, (2, 1, 4))):
        mesh = make_mesh(*shape, devices=jax.devices()[:8])
        model = Llama(cfg, nnx.Rngs(seed))
        state = nnx.state(model)  # every parameter onto the mesh as the rules table says
        nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state),
                                                       nnx.to_pure_dict(state_shardings(state, mesh))))
        nnx.update(model, state)
        states.append(create_state(model, tx, mesh))
    src, dst = states
    src.step = 3
    src.opt_state = jax.tree.map(lambda x: x + 1 if x.ndim else x + 3, src.opt_state)
    ck = Checkpoints(tmp_path, keep=1)
    ck.save(src, {"next": 7}, {"best_eval_loss": 1.5})
    ck.wait()
    data_state, meta = ck.restore(dst)
    ck.close()
    assert data_state == {"next": 7} and meta["best_eval_loss"] == 1.5 and dst.step == 3
    for a, b in zip(jax.tree.leaves(src.params), jax.tree.leaves(dst.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    q = dst.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and q.sharding.mesh.shape["tensor"] == 4
    for a, b in zip(jax.tree.leaves(src.opt_state), jax.tree.leaves(dst.opt_state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_dpo_command_end_to_end(world, tmp_path, capsys):
    from kt_jax.data.records import read_records

    cfg = _config(world, tmp_path / "dpo", train_file=str(world / "kc.jsonl"), finetuning="lora",
                  **{"train.num_steps": 4, "train.save_every": 4, "data.pack": False, "lora.rank": 4,
                     "data.group_preferences": True})  # grouped rows on the 8-way mesh
    assert main(["dpo", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "dpo (lora): 4/4 steps" in out and "exported" in out
    run = tmp_path / "dpo"
    for name in ("config.yaml", "metrics.jsonl", "kc_with_ref.jsonl", "summary.json", "export/config.json"):
        assert (run / name).exists(), name
    recs, _ = read_records(run / "kc_with_ref.jsonl", "kc")
    assert all(r.ref_chosen_logp is not None and r.ref_chosen_logp < 0 for r in recs)
    # the reference is the base model: scoring the base directly gives the stored numbers
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.scoring import sequence_logprobs
    from kt_jax.model.hf import load_pretrained

    base = load_pretrained(world / "model")
    got = sequence_logprobs(base, load_tokenizer(world / "model"), [(alpaca_prompt(recs[0].question), recs[0].chosen)],
                            max_len=192)
    assert got[0][0] == pytest.approx(recs[0].ref_chosen_logp, abs=1e-3)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/accuracy", "rewards/margin", "loss/sft", "tokens_per_s", "lr"} <= set(rows[0])
    assert any(r["split"] == "eval" for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_rows"] == 4 and summary["trainable_params"] == 2 * 2 * 2 * 64 * 4
    assert main(["dpo", "--config", str(cfg), "optim.learning_rate=0"]) == 2  # invalid config: one-line error
    assert "optim.learning_rate" in capsys.readouterr().err
