"""Every shipped config without a `world:` section runs through `kt-jax run` end to end.

As written, except: the LLM backends switched to offline, a tiny random Llama (with a SentencePiece tokenizer
for Llama-2 configs, byte-level BPE for Llama-3 ones) as the base, 24 training rows, 3 test rows and short
generations. The folder is listed, so a config added later is covered the day it lands. Rows come from the
shared Dolly / MedQuAD files when present (real text), else from a generated world's QA pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kt_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "knowtuning"
PAPER_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
                       if "world" not in (yaml.safe_load(p.read_text()) or {}))
TRAIN_ROWS, TEST_ROWS = 24, 3


def _rows(name: str, tmp: Path) -> list[dict[str, str]]:
    src = SHARED / ("medquad_train_v1.json" if "medquad" in name else "dolly_train.json")
    if src.exists():
        return json.loads(src.read_text())[: TRAIN_ROWS + TEST_ROWS]
    from kt_jax.world.generator import WorldConfig, generate_world
    from kt_jax.world.render import write_world

    write_world(generate_world(WorldConfig(seed=0)), tmp / "world")
    rows = [row for split in ("qa_train", "qa_test")
            for row in json.loads((tmp / "world" / f"{split}.json").read_text())]
    return rows[: TRAIN_ROWS + TEST_ROWS]


def _tiny_base(name: str, rows: list[dict[str, str]], out: Path) -> Path:
    from helpers.hf_fixtures import LLAMA2_TINY, LLAMA3_TINY, make_hf_llama

    from kt_jax.data.tokenizer import train_bpe_tokenizer, train_sentencepiece_tokenizer

    llama3 = "llama3" in name
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows] * 4
    if llama3:
        train_bpe_tokenizer(texts, 512, out)
    else:
        train_sentencepiece_tokenizer(texts, 512, out)
    arch = {**(LLAMA3_TINY if llama3 else LLAMA2_TINY), "vocab_size": 512, "max_position_embeddings": 2048}
    make_hf_llama(out, seed=5, **arch)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_shipped_config_runs_end_to_end(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    rows = _rows(name, tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(rows[:TRAIN_ROWS]))
    (tmp_path / "test.json").write_text(json.dumps(rows[TRAIN_ROWS:]))
    base = _tiny_base(name, rows, tmp_path / "base")
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(ROOT / "configs" / f"{name}.yaml"), f"run_dir={run_dir}",
                 f"base_model={base}", f"train_file={tmp_path / 'train.json'}", f"test_file={tmp_path / 'test.json'}",
                 "knowledge.backend=offline", "knowledge.backend_options:={}", "eval.backend=offline",
                 "eval.backend_options:={}", "generate.max_new_tokens=8"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for stage in ("sft", "dpo"):  # trained as shipped: remat, dtypes and LoRA untouched
        assert resolved[stage]["train"] == {**resolved[stage]["train"], **cfg[stage]["train"]}
    systems = cfg["systems"]
    assert set(summary["metrics"]) == set(systems)
    for system in systems:
        assert (run_dir / "train" / system / "export" / "config.json").exists()
        preds = (run_dir / "predictions" / system / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == TEST_ROWS
        metrics = summary["metrics"][system]
        assert 0.0 <= metrics["meteor"] <= 1.0
        if cfg.get("eval", {}).get("bertscore"):
            assert -1.0 <= metrics["bertscore_f1"] <= 1.0
    report = (run_dir / "report.md").read_text()
    assert "| SFT |" in report and "| KnowTuning |" in report
    assert f"kt-jax run {cfg['name']}: done" in out.out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_system_runs_on_a_paper_config(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """All systems (ablations, RLAIF, FactTune, the step control) train and get a report row; offline backend.

    A tiny random Llama's sampled answers are all noise, which every judge ties (no pair): the RLAIF/FactTune
    samples are replaced by answers of known quality (seed 0: the reference; others: its first sentence plus a
    false one), so that the rest of their path (pairs, reference log-probs, DPO, generation, report) runs for real.
    """
    import kt_jax.inference.generate_file as gf
    from kt_jax.data.records import write_rows
    from kt_jax.workflow.config import SYSTEM_LABELS, SYSTEMS

    real_generate = gf.generate_file

    def generate_file(cfg, *, mesh, progress=True):
        if Path(cfg.out).parent.name != "samples":
            return real_generate(cfg, mesh=mesh, progress=progress)
        rows = json.loads(Path(cfg.data).read_text())
        answers = [r["output"] if cfg.seed == 0 else r["output"].split(". ")[0] + ". The moon is made of cheese."
                   for r in rows]
        write_rows(Path(cfg.out) / "predictions.jsonl", [
            {"id": i, "question": r["instruction"], "input": r["input"], "reference": r["output"], "prediction": a,
             "new_tokens": 1, "finished": True} for i, (r, a) in enumerate(zip(rows, answers, strict=True))])
        return {"rows": len(rows)}

    monkeypatch.setattr(gf, "generate_file", generate_file)

    name = PAPER_CONFIGS[0]
    rows = _rows(name, tmp_path)[:24]
    (tmp_path / "train.json").write_text(json.dumps(rows[:20]))
    (tmp_path / "test.json").write_text(json.dumps(rows[20:]))
    base = _tiny_base(name, rows, tmp_path / "base")
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(ROOT / "configs" / f"{name}.yaml"), f"run_dir={run_dir}",
                 f"base_model={base}", f"train_file={tmp_path / 'train.json'}", f"test_file={tmp_path / 'test.json'}",
                 "knowledge.backend=offline", "knowledge.backend_options:={}", "eval.backend=offline",
                 "eval.backend_options:={}", "generate.max_new_tokens=12", f"systems=[{','.join(SYSTEMS)}]",
                 "preferences.k=2", "sft.data.max_len=256", "dpo.data.max_len=256", "knowledge.max_len=256",
                 "sft.train.num_epochs=1", "eval.bertscore=false"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["metrics"]) == list(SYSTEMS)
    report = (run_dir / "report.md").read_text()
    for system in SYSTEMS:
        assert f"| {SYSTEM_LABELS[system]} |" in report
    ka_steps = json.loads((run_dir / "stages" / "ka.json").read_text())["summary"]["total_steps"]
    assert json.loads((run_dir / "train" / "sft_steps" / "summary.json").read_text())["steps"] == ka_steps
    for method in ("rlaif", "facttune"):
        pairs = (run_dir / "knowledge" / f"{method}_ref.jsonl").read_text().splitlines()
        assert all(json.loads(p)["aspect"] == method for p in pairs)
    _every_adapter_loads_in_peft(base, run_dir, [s for s in SYSTEMS if (run_dir / "train" / s / "export" /
                                                                     "adapter").is_dir()])
    for drop, aspect in (("no_kcc", "completeness"), ("no_kfc", "factuality"), ("no_klc", "logicality")):
        kept = [json.loads(p) for p in (run_dir / "knowledge" / f"kc_ref_{drop}.jsonl").read_text().splitlines()]
        assert kept and all(r["aspect"] != aspect for r in kept)


def _every_adapter_loads_in_peft(base: Path, run_dir: Path, systems: list[str]) -> None:
    """peft.PeftModel.from_pretrained(base, train/<system>/export/adapter) = the merged export's logits (1e-4)."""
    import numpy as np
    import peft
    import torch
    import transformers

    assert systems, "no LoRA system exported an adapter"
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])
    for system in systems:
        export = run_dir / "train" / system / "export"
        with torch.no_grad():
            merged = transformers.LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()(ids).logits
            hf_base = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
            adapted = peft.PeftModel.from_pretrained(hf_base, export / "adapter").eval()(ids).logits
        np.testing.assert_allclose(adapted.numpy(), merged.numpy(), atol=1e-4, err_msg=system)
