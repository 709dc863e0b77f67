"""The KnowTuning run as resumable stages over the library, in one run directory (`kt-jax run --config ...`).

world -> pretrain (when the config has a world) | inputs (QA files + a HF base model) -> knowledge (extract, score
with the base model, KA, KC) -> reference (DPO reference log-probs of every KC pair under the BASE model, once)
-> sft (baseline on the original QA) -> ka (KA-SFT) -> knowtuning (DPO+NLL from the KA weights) -> no_ka (ablation:
DPO from the SFT weights) -> generate_<system> -> evaluate -> world_metrics -> report. Every stage gets the run's mesh;
models are loaded in the compute dtype of the stage that uses them. Each stage's key chains its upstream stages'
keys with its own settings (workflow.resume), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kt_jax.config import save_config
from kt_jax.distributed import is_main_process
from kt_jax.runlock import RunLock
from kt_jax.workflow.config import SYSTEM_LABELS, PipelineConfig
from kt_jax.workflow.report import write_report
from kt_jax.workflow.resume import Stages

_NO_PATHS = {"knowledge": dict(data="", out="", model="", tokenizer=""),
             "generate": dict(model="", data="", out="", tokenizer="")}


def _settings(section: Any) -> Any:
    """A section's settings without the paths the run fills in (they must not change a stage's key)."""
    name = {"KnowledgeConfig": "knowledge", "GenerateConfig": "generate"}.get(type(section).__name__)
    return dataclasses.replace(section, **_NO_PATHS[name]) if name else section


class Pipeline:
    """The stages of one `kt-jax run`, wired through files in the run directory."""

    def __init__(self, cfg: PipelineConfig, mesh: Any = None):
        cfg.validate()
        self.cfg = cfg
        self.dir = Path(cfg.run_dir or f"runs/{cfg.name}")
        self.stages = Stages(self.dir)
        self.mesh = mesh
        self.base_model = cfg.base_model
        self.tokenizer = cfg.tokenizer or cfg.base_model
        self.train_file, self.test_file = cfg.train_file, cfg.test_file
        self.source = "pretrain" if cfg.world is not None and not cfg.base_model else "inputs"

    def _mesh(self) -> Any:
        if self.mesh is None:
            self.mesh = self.cfg.mesh.build()
        return self.mesh

    # -- data and base model -------------------------------------------------------------------------------
    def world(self) -> None:
        from kt_jax.world.generator import generate_world
        from kt_jax.world.render import write_world

        out = self.dir / "world"
        self.stages.run("world", lambda: {k: str(v) for k, v in write_world(generate_world(self.cfg.world),
                                                                                out).items()},
                        settings=self.cfg.world, outputs=[out / "qa_train.json", out / "qa_test.json"])
        self.train_file, self.test_file = str(out / "qa_train.json"), str(out / "qa_test.json")

    def pretrain(self) -> None:
        from kt_jax.world.generator import World
        from kt_jax.world.pretrain import WorldPreset, pretrain_world

        out = self.dir / "base"
        preset = WorldPreset(world=self.cfg.world, pretrain=self.cfg.pretrain)

        def run() -> dict[str, Any]:
            stats = pretrain_world(preset, out, world=World.load(self.dir / "world" / "world.json"), progress=True,
                                   mesh=self._mesh())
            return {k: v for k, v in stats.items() if k != "losses"}

        result = self.stages.run("pretrain", run, settings=preset, upstream=["world"],
                                 outputs=[out / "model" / "config.json", out / "pretrain.json"])
        self.base_model = self.tokenizer = str(out / "model")
        self.base_summary = result.summary

    def inputs(self) -> None:
        """The run's external inputs (QA files, base model, tokenizer), fingerprinted for the stages downstream."""
        external = [p for p in dict.fromkeys((self.train_file, self.test_file, self.base_model, self.tokenizer)) if p]
        self.stages.run("inputs", lambda: None, settings={"files": external}, external=external)

    # -- knowledge -----------------------------------------------------------------------------------------
    def knowledge(self) -> None:
        from kt_jax.knowledge.job import build_knowledge

        out = self.dir / "knowledge"
        kcfg = dataclasses.replace(self.cfg.knowledge, data=self.train_file, out=str(out), model=self.base_model,
                                   tokenizer=self.tokenizer)
        dtype = self.cfg.sft.train.compute_dtype  # the model being tuned scores its facts in its compute dtype
        self.stages.run("knowledge", lambda: _brief(build_knowledge(kcfg, mesh=self._mesh(), dtype=dtype)),
                        settings={"knowledge": _settings(kcfg), "dtype": dtype}, upstream=[self.source],
                        outputs=[out / "ka.jsonl", out / "kc.jsonl"])

    def reference(self) -> None:
        """KC pairs + reference log-probs under the base model (the original's reference), computed once."""
        from kt_jax.train.job import ReferenceSpec

        out = self.dir / "knowledge" / "kc_ref.jsonl"
        data = self.cfg.dpo.data
        spec = ReferenceSpec(model=self.base_model, lora="as_loaded", dtype=self.cfg.dpo.train.compute_dtype,
                             template=data.template, max_len=data.max_len)

        def run() -> dict[str, Any]:
            import jax.numpy as jnp

            from kt_jax.data.records import read_records
            from kt_jax.data.tokenizer import load_tokenizer
            from kt_jax.model.hf import load_pretrained
            from kt_jax.train.job import attach_reference_logps

            records, _ = read_records(self.dir / "knowledge" / "kc.jsonl", "kc")
            model = load_pretrained(self.base_model, mesh=self._mesh(), dtype=getattr(jnp, spec.dtype))
            done = attach_reference_logps(model, load_tokenizer(self.tokenizer), records, spec, self._mesh(), out)
            return {"pairs": len(done), "dtype": spec.dtype}

        self.stages.run("reference", run, settings=dataclasses.replace(spec, model=""),
                        upstream=["knowledge", self.source], outputs=[out])

    # -- training ------------------------------------------------------------------------------------------
    def tune(self, name: str, *, start: str | None, train_file: str, kind: str, upstream: list[str]) -> str:
        """Train system `name` (train/<name>/) from the base model (`start` None) or from stage `start`'s result.

        Continuing a stage follows the original (LLaMA-Factory `--checkpoint_dir <start> --resume_lora_training`):
        when both stages train the same LoRA adapter (finetuning: lora and equal `lora` sections), the job loads the
        base model + `start`'s exported PEFT adapter and keeps training that adapter; otherwise (LoRA then full, full
        then LoRA, or a different adapter shape) it starts from `start`'s merged export (full fine-tuning of those
        weights, or a fresh adapter on them). DPO reference log-probs come from the `reference` stage (the base
        model) in every case. Returns the merged export directory.
        """
        from kt_jax.train.job import TrainJobConfig, run_training

        stage = self.cfg.dpo if kind == "kc" else self.cfg.sft
        out = self.dir / "train" / name
        model, adapter, how = self.base_model, None, "base"
        if start is not None:
            before = self.dir / "train" / start / "export"
            if stage.finetuning == "lora" and self.cfg.sft.finetuning == "lora" and stage.lora == self.cfg.sft.lora:
                adapter, how = str(before / "adapter"), "adapter"
            else:
                model, how = str(before), "merged"
        job = TrainJobConfig.of(stage, model=model, tokenizer=self.tokenizer, train_file=train_file,
                                output_dir=str(out), kind=kind, mesh=self.cfg.mesh, init_adapter=adapter)
        outputs = [out / "export" / "config.json"]
        if stage.finetuning == "lora":
            outputs.append(out / "export" / "adapter" / "adapter_config.json")
        # A killed stage resumes from the latest checkpoint inside train/<name>.
        self.stages.run(name, lambda: {**_brief(run_training(job, mesh=self._mesh())), "start": how},
                        settings={"tune": stage, "kind": kind, "init": start or self.source, "start": how},
                        upstream=[start or self.source, *upstream], outputs=outputs)
        return str(out / "export")

    # -- generation and evaluation -------------------------------------------------------------------------
    def generate(self, name: str, model: str) -> str:
        from kt_jax.inference.generate_file import generate_file

        out = self.dir / "predictions" / name
        gcfg = dataclasses.replace(self.cfg.generate, model=model, data=self.test_file, out=str(out),
                                   tokenizer=self.tokenizer, template=self.cfg.sft.data.template)
        self.stages.run(f"generate_{name}", lambda: _brief(generate_file(gcfg, mesh=self._mesh())),
                        settings=_settings(gcfg), upstream=[name, self.source],
                        outputs=[out / "predictions.jsonl"])
        return str(out / "predictions.jsonl")

    def evaluate(self, predictions: dict[str, str]) -> dict[str, Any]:
        from kt_jax.eval.job import evaluate_files

        out = self.dir / "eval"
        ecfg = dataclasses.replace(self.cfg.eval, predictions=dict(predictions), out=str(out), baseline="sft")
        self.stages.run("evaluate", lambda: _brief(evaluate_files(ecfg)),
                        settings=dataclasses.replace(ecfg, predictions={}, out=""),
                        upstream=[f"generate_{name}" for name in predictions],
                        outputs=[out / "metrics.json", out / "report.md"])
        metrics = json.loads((out / "metrics.json").read_text())
        if self.cfg.world is not None:
            self.stages.run("world_metrics", lambda: self._world_metrics(predictions), settings=sorted(predictions),
                            upstream=["world", *(f"generate_{name}" for name in predictions)],
                            outputs=[out / "world_metrics.json"])
            for name, values in json.loads((out / "world_metrics.json").read_text()).items():
                metrics[name] = {**values, **metrics.get(name, {})}
        return metrics

    def _world_metrics(self, predictions: dict[str, str]) -> None:
        from kt_jax.eval.job import load_predictions
        from kt_jax.world.checker import evaluate_answers
        from kt_jax.world.generator import World
        from kt_jax.world.render import load_questions

        world = World.load(self.dir / "world" / "world.json")
        questions = load_questions(self.dir / "world" / "questions.jsonl")
        table = {}
        for name, path in predictions.items():
            rows = load_predictions(path)
            summary, _ = evaluate_answers(world, [questions[r["question"]] for r in rows],
                                          [r["prediction"] for r in rows])
            table[name] = summary
        (self.dir / "eval" / "world_metrics.json").write_text(json.dumps(table, indent=2) + "\n")

    # -- all -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every stage in order (skipping finished ones), holding the run directory's lock throughout."""
        import jax

        with RunLock(self.dir, jax.process_index()):
            return self._run()

    def _run(self) -> dict[str, Any]:
        start = time.perf_counter()
        save_config(self.cfg, self.dir / "config.yaml")
        if self.source == "pretrain":
            self.world()
            self.pretrain()
        else:
            if self.cfg.world is not None:
                self.world()
            self.inputs()
        self.knowledge()
        systems = self.cfg.systems
        kdir = self.dir / "knowledge"
        models = {"sft": self.tune("sft", start=None, train_file=self.train_file, kind="qa", upstream=[])}
        if {"ka", "knowtuning"} & set(systems):
            models["ka"] = self.tune("ka", start=None, train_file=str(kdir / "ka.jsonl"), kind="ka",
                                     upstream=["knowledge"])
        if {"knowtuning", "no_ka"} & set(systems):
            self.reference()
            kc = str(kdir / "kc_ref.jsonl")
            if "knowtuning" in systems:
                models["knowtuning"] = self.tune("knowtuning", start="ka", train_file=kc, kind="kc",
                                                 upstream=["reference"])
            if "no_ka" in systems:
                models["no_ka"] = self.tune("no_ka", start="sft", train_file=kc, kind="kc", upstream=["reference"])
        predictions = {name: self.generate(name, models[name]) for name in systems}
        metrics = self.evaluate(predictions)
        report = self.dir / "report.md"
        summary = {"run_dir": str(self.dir), "report": str(report), "seconds": time.perf_counter() - start,
                   "stages": [{"name": r.name, "skipped": r.skipped, "seconds": round(r.seconds, 1)}
                              for r in self.stages.results], "metrics": metrics}
        if is_main_process():  # stage outputs exist on every worker's disk; the report and summary on process 0
            probe = getattr(self, "base_summary", None) or (self.stages.record("pretrain") or {}).get("summary")
            write_report(report, self.cfg.name, self.dir, metrics, probe, SYSTEM_LABELS)
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """What a stage record keeps of a library call's summary (no bulky config echoes)."""
    return {k: v for k, v in summary.items() if k not in ("config", "losses")}
