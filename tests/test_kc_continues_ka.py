"""KC continues the KA run as the original (--resume_lora_training): the KA adapter keeps training, reference = base.

One tiny `kt-jax run` pipeline (a BPE tokenizer, a random Llama, hand-made KA rows and KC pairs) trains KA with
LoRA, scores the reference, and runs the first KnowTuning (DPO) step; the checks use HF PyTorch + peft in float64.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.hf_fixtures import make_hf_llama
from safetensors.numpy import load_file

from kt_jax.data.loader import DataConfig
from kt_jax.data.records import KCRecord, QARecord, read_records, write_records
from kt_jax.data.templates import alpaca_prompt, encode_pair
from kt_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from kt_jax.model.lora import LoRAConfig
from kt_jax.sharding import MeshConfig, make_mesh
from kt_jax.train.config import OptimConfig, TrainConfig
from kt_jax.train.job import TrainJobConfig, TuneConfig, run_training
from kt_jax.workflow.config import PipelineConfig
from kt_jax.workflow.stages import Pipeline

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # one tiny pipeline: ~2.5 min on 2 cores
WORDS = ["red", "blue", "green", "river", "castle", "queen", "king", "water", "stone", "fire", "north", "south"]
LORA = LoRAConfig(targets=("q_proj", "v_proj"), rank=4, alpha=8.0)
DATA = DataConfig(max_len=192, batch_size=8, buckets=(64, 128, 192), seed=1)
KC_LR = 1e-4


def _tune(finetuning: str, lr: float, steps: int) -> TuneConfig:
    return TuneConfig(finetuning=finetuning, lora=LORA, data=DATA, optim=OptimConfig(learning_rate=lr),
                      train=TrainConfig(num_steps=steps, eval_rows=0, compute_dtype="float32", progress=False,
                                        tensorboard=False, chunk_size=16, async_checkpoints=False))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A 300-token BPE, a tiny random Llama over it, 16 QA/KA rows and 8 KC pairs."""
    root = tmp_path_factory.mktemp("kc_world")
    rng = np.random.default_rng(0)
    sent = lambda n: " ".join(rng.choice(WORDS, n)) + "."
    qa = [QARecord(f"What is {sent(2)}?", sent(int(rng.integers(3, 8)))) for _ in range(16)]
    kc = [KCRecord(f"Tell me {sent(2)}", sent(5), sent(4)) for _ in range(8)]
    corpus = Path(__file__).parent / "fixtures" / "corpus.txt"
    train_bpe_tokenizer([corpus.read_text(), *(r.question + r.answer for r in qa)], 300, root / "tok")
    model = make_hf_llama(root / "model", seed=3, vocab_size=320)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).write_bytes((root / "tok" / name).read_bytes())
    write_records(root / "qa.jsonl", qa)
    write_records(root / "kc.jsonl", kc)
    return root


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory) -> Pipeline:
    """Pipeline stages ka (LoRA SFT, 6 steps at lr 1e-2), reference (base model) and knowtuning (1 DPO step)."""
    cfg = PipelineConfig(name="kc", run_dir=str(tmp_path_factory.mktemp("kc_run")), train_file=str(inputs / "qa.jsonl"),
                         test_file=str(inputs / "qa.jsonl"), base_model=str(inputs / "model"),
                         sft=_tune("lora", 1e-2, 6), dpo=_tune("lora", KC_LR, 1), mesh=MeshConfig(1, 1, 1))
    p = Pipeline(cfg, mesh=_mesh())
    p.inputs()
    kdir = p.dir / "knowledge"
    kdir.mkdir(parents=True)
    (kdir / "kc.jsonl").write_bytes((inputs / "kc.jsonl").read_bytes())
    p.stages.keys["knowledge"] = "hand-made"  # the knowledge stage's outputs are written above
    p.tune("ka", start=None, train_file=str(inputs / "qa.jsonl"), kind="ka", upstream=["knowledge"])
    p.reference()
    p.tune("knowtuning", start="ka", train_file=str(kdir / "kc_ref.jsonl"), kind="kc", upstream=["reference"])
    return p


def _hf(base: Path, adapter: Path | None = None, disable: bool = False):
    """HF PyTorch float64 model: the base, or base + a PEFT adapter."""
    import peft
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    return model.double().eval()


def _response_logps(model, tok, rec: KCRecord, side: str) -> np.ndarray:
    """float64 log-probs of the `side` answer's tokens (EOS included) given the alpaca prompt."""
    import torch

    pair = encode_pair(tok, alpaca_prompt(rec.question, rec.input, DATA.template), getattr(rec, side), DATA.max_len)
    ids = pair.prompt_ids + pair.response_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    return logp[len(pair.prompt_ids) - 1:]


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "export" / "adapter" / "adapter_model.safetensors")


def test_first_kc_step_trains_the_ka_adapter(run):
    assert run.stages.record("knowtuning")["summary"]["start"] == "adapter"
    job = json.loads((run.dir / "train" / "knowtuning" / "summary.json").read_text())["config"]
    assert job["model"] == run.base_model and job["init_adapter"].endswith("train/ka/export/adapter")
    ka, kc = _adapter(run.dir / "train" / "ka"), _adapter(run.dir / "train" / "knowtuning")
    assert sorted(ka) == sorted(kc) and len(ka) == 2 * 2 * 2
    for name in ka:
        step = np.abs(kc[name] - ka[name]).max()
        assert 0.5 * KC_LR < step <= KC_LR * 1.001, name  # one Adam step of size lr away from the KA adapter ...
        if "lora_B" in name:
            assert np.abs(ka[name]).max() > 100 * KC_LR, name  # ... whose B is far from a fresh zero B


def test_reference_is_the_base_model_and_exports_load_in_peft(run):
    import torch

    base, ka_adapter = Path(run.base_model), run.dir / "train" / "ka" / "export" / "adapter"
    tok = load_tokenizer(base)
    pairs, _ = read_records(run.dir / "knowledge" / "kc_ref.jsonl", "kc")
    hf_base, hf_ka = _hf(base), _hf(base, ka_adapter)
    for rec in pairs[:3]:
        for side, stored in (("chosen", rec.ref_chosen_logp), ("rejected", rec.ref_rejected_logp)):
            assert stored == pytest.approx(_response_logps(hf_base, tok, rec, side).sum(), abs=1e-4)
            assert abs(stored - _response_logps(hf_ka, tok, rec, side).sum()) > 1e-2  # not the KA policy
    ids = torch.tensor(np.random.default_rng(0).integers(0, 320, (2, 12)))
    for name in ("ka", "knowtuning"):
        export = run.dir / "train" / name / "export"
        with torch.no_grad():
            merged = _hf(export)(ids).logits.numpy()
            adapted = _hf(base, export / "adapter")(ids).logits.numpy()
        np.testing.assert_allclose(adapted, merged, atol=1e-4)


def test_policy_equal_to_reference_gives_ln2_plus_gamma_nll(run, inputs, tmp_path):
    """reference = initial_policy (base + KA adapter): Δ = 0 at step 0, so loss = ln 2 + γ·mean token-mean NLL."""
    tune = dataclasses.replace(run.cfg.dpo, dpo=dataclasses.replace(run.cfg.dpo.dpo, reference="initial_policy"))
    adapter = run.dir / "train" / "ka" / "export" / "adapter"
    job = TrainJobConfig.of(tune, model=run.base_model, train_file=str(inputs / "kc.jsonl"), kind="kc",
                            output_dir=str(tmp_path / "dpo"), init_adapter=str(adapter), export=False)
    run_training(job, mesh=_mesh())
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in logged if m["split"] == "train")
    hf = _hf(Path(run.base_model), adapter)
    tok = load_tokenizer(run.base_model)
    pairs, _ = read_records(inputs / "kc.jsonl", "kc")
    assert len(pairs) == DATA.batch_size  # the first batch holds every pair
    nll = np.mean([-_response_logps(hf, tok, rec, "chosen").mean() for rec in pairs])
    gamma = tune.dpo.sft_weight
    assert first["loss"] == pytest.approx(math.log(2) + gamma * nll, abs=2e-5)
    assert gamma * nll > 0.1  # the NLL term is not negligible next to ln 2


def test_lora_then_full_starts_from_the_merged_export(run, inputs):
    """dpo.finetuning: full after a LoRA KA: the policy is the merged KA export (no adapter to continue)."""
    cfg = dataclasses.replace(run.cfg, dpo=_tune("full", KC_LR, 1))
    p = Pipeline(cfg, mesh=_mesh())
    p.stages.keys.update(run.stages.keys)
    kc = str(run.dir / "knowledge" / "kc_ref.jsonl")
    p.tune("no_ka_full", start="ka", train_file=kc, kind="kc", upstream=["reference"])
    job = json.loads((run.dir / "train" / "no_ka_full" / "summary.json").read_text())["config"]
    assert job["model"] == str(run.dir / "train" / "ka" / "export") and job["init_adapter"] is None
    assert p.stages.record("no_ka_full")["summary"]["start"] == "merged"
    assert not (run.dir / "train" / "no_ka_full" / "export" / "adapter").exists()
