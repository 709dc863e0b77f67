"""The KnowTuning recipe's details (issue 14): add_bos on every prompt path, the by-question held-out split,
final vs best export, and the reference log-probs' compute dtype."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kt_jax.data.records import KARecord, KCRecord, QARecord, read_records, write_records
from kt_jax.data.templates import alpaca_prompt, encode_pair, encode_prompt
from kt_jax.errors import ConfigError
from kt_jax.train.config import DPOConfig, TrainConfig
from kt_jax.train.job import TrainJobConfig, TuneConfig, question_key, reference_dtype, run_training, split_eval

pytestmark = pytest.mark.timeout(600)
WORDS = ["red", "blue", "green", "river", "castle", "queen", "king", "water", "stone", "fire", "north", "south"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama (vocab 320) with a BPE tokenizer (BOS <s>) in its directory, plus QA and KC files."""
    from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

    from kt_jax.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    sent = lambda n: " ".join(rng.choice(WORDS, n)) + "."
    qa = [QARecord(f"What is {sent(2)}?", sent(int(rng.integers(3, 8)))) for _ in range(40)]
    kc = [KCRecord(f"Tell me {sent(2)}", sent(5), sent(4), "completeness") for _ in range(12)]
    model = make_hf_llama(root / "model", seed=7, **{**LLAMA2_TINY, "vocab_size": 320})
    corpus = Path(__file__).parent / "fixtures" / "corpus.txt"
    train_bpe_tokenizer([corpus.read_text(), *(r.question + r.answer for r in qa), alpaca_prompt("x")], 300, model)
    write_records(root / "qa.jsonl", qa)
    write_records(root / "kc.jsonl", kc)
    return root


# -- add_bos: one prompt encoding for training, fact scoring, reference log-probs and generation ---------------------


def _scored_prompts(monkeypatch) -> list[list[int]]:
    """Replace the scorer's jitted pass with a recorder of the prompt ids it receives."""
    import kt_jax.inference.scoring as scoring

    seen: list[list[int]] = []

    def fake(model, pairs, **_):
        seen.extend(list(p) for p, _ in pairs)
        return [(-1.0, max(len(r), 1)) for _, r in pairs]

    monkeypatch.setattr(scoring, "score_encoded", fake)
    return seen


def test_add_bos_changes_every_prompt_path_the_same_way(tiny, tmp_path, monkeypatch) -> None:
    import kt_jax.inference.sampling as sampling
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.generate_file import GenerateConfig, generate_file
    from kt_jax.inference.score_file import ScoreConfig, score_file
    from kt_jax.train.job import ReferenceSpec, attach_reference_logps

    tok = load_tokenizer(tiny / "model")
    assert tok.bos_id is not None
    question = "What is red river?"
    (tmp_path / "facts.jsonl").write_text(json.dumps({"question": question, "facts": ["Red river."]}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"instruction": question, "input": "", "output": "x"}) + "\n")
    kc = [KCRecord(question, "Red river.", "Blue river.", "completeness")]
    generated: list[list[int]] = []

    def fake_generate_ids(model, prompts, sampling_cfg, **_):
        generated.extend(list(p) for p in prompts)
        return [[tok.eos_id] for _ in prompts]

    monkeypatch.setattr(sampling, "generate_ids", fake_generate_ids)
    ids: dict[bool, dict[str, list[int]]] = {}
    for add_bos in (True, False):
        scored = _scored_prompts(monkeypatch)
        score_file(ScoreConfig(model=str(tiny / "model"), input=str(tmp_path / "facts.jsonl"),
                               output=str(tmp_path / f"scored_{add_bos}.jsonl"), add_bos=add_bos),
                   mesh=None, progress=False)
        fact_ids = scored[-1]
        spec = ReferenceSpec(model="m", lora="as_loaded", dtype="float32", template="llamafactory-0.5.3",
                             max_len=256, add_bos=add_bos)
        attach_reference_logps(object(), tok, kc, spec, None, tmp_path / f"ref_{add_bos}.jsonl")
        assert scored[-2] == scored[-1]  # chosen and rejected share the prompt
        generate_file(GenerateConfig(model=str(tiny / "model"), data=str(tmp_path / "test.jsonl"),
                                     out=str(tmp_path / f"gen_{add_bos}"), add_bos=add_bos), mesh=None, progress=False)
        train_ids = encode_pair(tok, alpaca_prompt(question), "Red river.", 256, add_bos=add_bos).prompt_ids
        ids[add_bos] = {"score": fact_ids, "reference": scored[-1], "generate": generated[-1], "train": train_ids}
    with_bos, without = ids[True], ids[False]
    for path in with_bos:
        assert with_bos[path] == with_bos["train"], path  # every path builds the training prompt
        assert with_bos[path][0] == tok.bos_id and without[path] == with_bos[path][1:], path
    assert encode_prompt(tok, alpaca_prompt(question), add_bos=False) == without["train"]
    stamp = json.loads((tmp_path / "scored_False.config.json").read_text())
    assert stamp.get("stamp", stamp).get("add_bos") is False  # a file scored without BOS is not reused with it


# -- held-out split by question --------------------------------------------------------------------------------------


def test_split_eval_by_question_never_puts_one_question_on_both_sides() -> None:
    ka = []
    for i in range(30):
        ka.append(KARecord(f"Q{i}?", "answer", "ctx" if i % 3 == 0 else ""))
        if i % 2 == 0:
            ka.append(KARecord(f"Fine {i}?", "facts", provenance="rewritten", source_question=f"Q{i}?"))
    kc = [KCRecord(f"Q{i}?", "c", f"r{a}", a) for i in range(40) for a in ("completeness", "factuality", "logicality")]
    for records, eval_rows in ((ka, 4), (kc, 10), (kc, 100)):
        for seed in range(5):
            train, held = split_eval(records, eval_rows, seed)
            assert len(train) + len(held) == len(records)
            assert {question_key(r) for r in train}.isdisjoint({question_key(r) for r in held})
            assert 0 < len(held) <= min(eval_rows, len(records) // 10)
            assert train == [r for r in records if r not in held]  # file order kept
    assert len(split_eval(kc, 12, 0)[1]) == 12  # whole questions of 3 pairs: exactly 4 of them
    assert split_eval(kc, 12, 0) == split_eval(kc, 12, 0) and split_eval(kc, 12, 0) != split_eval(kc, 12, 1)
    assert split_eval(kc, 0, 0) == (kc, [])  # eval_rows = 0: every pair trains (the original's KC)
    assert question_key(ka[1]) == question_key(ka[0]) == "Q0?"


# -- export: final vs best -----------------------------------------------------------------------------------------


def _job(tiny: Path, out: Path, **train: object) -> TrainJobConfig:
    import dataclasses

    from kt_jax.data.loader import DataConfig
    from kt_jax.train.config import OptimConfig

    tcfg = TrainConfig(num_steps=6, eval_rows=4, eval_every_frac=1 / 6, save_every=1, compute_dtype="float32",
                       progress=False, tensorboard=False, async_checkpoints=False, chunk_size=16, keep_checkpoints=10)
    return TrainJobConfig(model=str(tiny / "model"), train_file=str(tiny / "qa.jsonl"), output_dir=str(out),
                          kind="qa", finetuning="full", data=DataConfig(max_len=128, batch_size=8, pack=False),
                          optim=OptimConfig(learning_rate=1.0), train=dataclasses.replace(tcfg, **train))


def _exported(run: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    weights = {}
    for f in sorted((run / "export").glob("*.safetensors")):
        weights.update(load_file(f))
    return np.concatenate([weights[k].ravel() for k in sorted(weights)])


@pytest.mark.slow
def test_export_final_weights_by_default_and_best_on_request(tiny, tmp_path) -> None:
    final = run_training(_job(tiny, tmp_path / "final"))
    best = run_training(_job(tiny, tmp_path / "best", export_weights="best"))
    assert final["best_step"] == best["best_step"] and final["best_step"] not in (None, 6)  # lr 1 overshoots
    assert (final["export_weights"], final["export_step"]) == ("final", 6)
    assert (best["export_weights"], best["export_step"]) == ("best", best["best_step"])
    assert not np.array_equal(_exported(tmp_path / "final"), _exported(tmp_path / "best"))
    # each export is the checkpoint it names: the last step's, or the best evaluation's
    from flax import nnx

    from kt_jax.model.hf import load_pretrained
    from kt_jax.train.checkpoint import Checkpoints
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state

    for run, which in ((tmp_path / "final", "latest"), (tmp_path / "best", "best")):
        ts = create_state(load_pretrained(tiny / "model"), make_optimizer(_job(tiny, run).optim, 6), None)
        ck = Checkpoints(run / "checkpoints", keep=10)
        if which == "best":
            ck.restore_best(ts)
        else:
            ck.restore(ts, 6)
        ck.close()
        exported = load_pretrained(run / "export")
        for a, b in zip(nnx.to_flat_state(nnx.state(exported, nnx.Param)),
                        nnx.to_flat_state(nnx.state(ts.model(), nnx.Param)), strict=True):
            assert a[0] == b[0] and np.array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))
    with pytest.raises(ConfigError, match="export_weights: best needs held-out rows"):
        TrainConfig(eval_rows=0, export_weights="best").validate()


# -- reference log-probs: the policy's compute dtype by default, float32 on request ----------------------------------


def test_reference_dtype_helper() -> None:
    bf16 = TuneConfig(train=TrainConfig(compute_dtype="bfloat16"))
    assert reference_dtype(bf16) == "bfloat16"
    assert reference_dtype(TuneConfig(train=TrainConfig(compute_dtype="bfloat16"),
                                      dpo=DPOConfig(reference_dtype="float32"))) == "float32"
    assert reference_dtype(TuneConfig(train=TrainConfig(compute_dtype="float32"))) == "float32"
    with pytest.raises(ConfigError, match=r"dpo\.reference_dtype"):
        DPOConfig(reference_dtype="float16").validate()


@pytest.mark.slow
def test_reference_logps_in_the_policy_dtype_by_default_float32_on_request(tiny, tmp_path) -> None:
    import dataclasses

    import jax.numpy as jnp

    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.scoring import sequence_logprobs
    from kt_jax.model.hf import load_pretrained
    from kt_jax.sharding import MeshConfig

    tok = load_tokenizer(tiny / "model")
    recs, _ = read_records(tiny / "kc.jsonl", "kc")
    pairs = [(alpaca_prompt(r.question), side) for r in recs for side in (r.chosen, r.rejected)]
    mesh = MeshConfig().build()  # the job's mesh, so bf16 sums see the same layout
    direct = {}
    for d in ("bfloat16", "float32"):
        base = load_pretrained(tiny / "model", mesh=mesh, dtype=getattr(jnp, d), param_dtype=jnp.float32)
        direct[d] = [s for s, _ in sequence_logprobs(base, tok, pairs, max_len=128, mesh=mesh)][::2]
    stored = {}
    for option, dtype in (("policy", "bfloat16"), ("float32", "float32")):
        job = _job(tiny, tmp_path / option, num_steps=1, eval_rows=0, compute_dtype="bfloat16")
        job = dataclasses.replace(job, kind="kc", train_file=str(tiny / "kc.jsonl"), finetuning="lora", export=False,
                                  dpo=DPOConfig(reference_dtype=option))
        run_training(job)
        out = tmp_path / option / "kc_with_ref.jsonl"
        assert json.loads(out.with_name(out.name + ".stamp.json").read_text())["dtype"] == dtype
        stored[option] = [r.ref_chosen_logp for r in read_records(out, "kc")[0]]
        np.testing.assert_allclose(stored[option], direct[dtype], rtol=0, atol=1e-4)
    assert not np.allclose(stored["policy"], stored["float32"], rtol=0, atol=1e-4)  # bf16 rounding shows
