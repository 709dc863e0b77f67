"""Systems beyond SFT / KA-SFT / KnowTuning: the KC ablations, the RLAIF and FactTune baselines, a step control.

- no_kcc / no_kfc / no_klc: KnowTuning (KC from the KA model) without the completeness / factuality / logicality
  comparison set.
- rlaif / facttune: DPO (+ the same beta, gamma and trainer) from the SFT model on pairs built from k answers the SFT
  model samples per train question: ranked by the backend's pairwise judge (RLAIF, Lee et al. 2023) or by fact
  precision through the backend (FactTune, Tian et al. 2023); reference = the base model, as for KnowTuning.
- sft_steps: SFT on the original QA for as many optimizer steps as KA-SFT took (separates "more examples about hard
  facts" from "more steps").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

Pipeline = Any  # workflow.stages.Pipeline (not imported: it imports this module)

ABLATIONS = ("no_kcc", "no_kfc", "no_klc")
BASELINES = ("rlaif", "facttune")


def ablation_pairs(pipe: Pipeline, name: str) -> str:
    """knowledge/kc_ref_<name>.jsonl: the reference-scored KC pairs without one comparison set."""
    from kt_jax.data.records import read_records, write_records
    from kt_jax.knowledge.compare import kc_subset

    src, out = pipe.dir / "knowledge" / "kc_ref.jsonl", pipe.dir / "knowledge" / f"kc_ref_{name}.jsonl"

    def run() -> dict[str, Any]:
        records, _ = read_records(src, "kc")
        kept = kc_subset(records, name)
        write_records(out, kept)
        return {"pairs": len(kept), "dropped": len(records) - len(kept)}

    pipe.stages.run(f"pairs_{name}", run, settings={"drop": name}, upstream=["reference"], outputs=[out])
    return str(out)


def sample_answers(pipe: Pipeline, sft_model: str) -> Path:
    """samples/samples.jsonl: k answers per train question sampled from the SFT model (the run's sampling preset)."""
    from kt_jax.data.records import read_rows, write_rows
    from kt_jax.inference.generate_file import generate_file

    k = pipe.cfg.preferences.k
    out = pipe.dir / "samples"
    base = dataclasses.replace(pipe.cfg.generate, model=sft_model, data=pipe.train_file, tokenizer=pipe.tokenizer,
                               template=pipe.cfg.sft.data.template, preset="knowtuning", limit=None)

    def run() -> dict[str, Any]:
        per_seed = []
        for seed in range(k):
            cfg = dataclasses.replace(base, out=str(out / f"seed{seed}"), seed=seed)
            generate_file(cfg, mesh=pipe.mesh_())
            per_seed.append(read_rows(out / f"seed{seed}" / "predictions.jsonl"))
        rows = [{"id": first["id"], "question": first["question"], "input": first.get("input", ""),
                 "reference": first["reference"], "answers": [s[i]["prediction"] for s in per_seed]}
                for i, first in enumerate(per_seed[0])]
        write_rows(out / "samples.jsonl", rows)
        return {"questions": len(rows), "k": k}

    pipe.stages.run("samples", run, settings={"k": k, "generate": dataclasses.replace(base, model="", data="")},
                    upstream=[pipe.chosen.get("sft", "sft"), pipe.source], outputs=[out / "samples.jsonl"],
                    scratch=[out])
    return out / "samples.jsonl"


def preference_pairs(pipe: Pipeline, method: str, samples: Path) -> str:
    """knowledge/<method>.jsonl: the baseline's KC-format pairs (+ rejects_<method>.jsonl with reasons)."""
    from kt_jax.data.records import read_rows, write_records, write_rows
    from kt_jax.errors import DataError
    from kt_jax.knowledge.preferences import build_preferences

    cfg = dataclasses.replace(pipe.cfg.preferences, method=method)
    out = pipe.dir / "knowledge" / f"{method}.jsonl"

    def run() -> dict[str, Any]:
        built = build_preferences(pipe.backend(), read_rows(samples), cfg, where=str(samples))
        rejects = write_rows(out.with_name(f"rejects_{method}.jsonl"), built.rejects)
        if not built.records:
            raise DataError(f"{samples}: {method} built no preference pair from {len(built.scores)} questions "
                            f"({dict(built.stats)}); every question tied or was rejected: see {rejects}")
        write_records(out, built.records)
        return {"pairs": len(built.records), "rejected": len(built.rejects), **dict(built.stats)}

    pipe.stages.run(f"pairs_{method}", run, settings={"preferences": cfg, "backend": pipe.backend_settings()},
                    upstream=["samples"], outputs=[out])
    return str(out)


def ka_steps(pipe: Pipeline) -> int:
    """How many optimizer steps the KA-SFT stage took (from its stage record)."""
    record = pipe.stages.record(pipe.chosen.get("ka", "ka")) or {}
    steps = (record.get("summary") or {}).get("total_steps")
    if not steps:
        raise RuntimeError("sft_steps needs the ka stage's step count; run it first")
    return int(steps)
