"""The KnowTuning run as resumable stages over the library, in one run directory (`kt-jax run --config ...`).

world -> pretrain (when the config has a world) | inputs (QA files + a HF base model) -> knowledge (extract, score
with the base model, KA, KC) -> sft (baseline on the original QA) -> ka (KA-SFT) -> reference (DPO reference
log-probs of every KC pair under the BASE model, once) -> knowtuning (DPO+NLL continuing the KA run: its LoRA adapter,
or its weights under full fine-tuning) -> the other systems (workflow.systems: ablations, baselines, a step control)
-> generate_<system> -> evaluate (+ on a world: base-model answers, cloze probe, determinism, differences and
validity: workflow.world_checks) -> report. Every stage gets the run's mesh; models are loaded in the compute dtype
of the stage that uses them. Each stage's key chains its upstream stages' keys with its own settings
(workflow.resume), so a killed run resumes where it stopped.
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
from kt_jax.workflow.search import search_table

# what the knowledge stage resumes from (its backend cache, knowledge_cache.sqlite3, is content-keyed and stays)
KNOWLEDGE_SCRATCH = ("facts.jsonl", "scored.jsonl", "scored.meta.json", "ka.json", "kc.json", "summary_all.json",
                     "rejects_extract.jsonl", "rejects_augment.jsonl", "rejects_compare.jsonl")
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
        self.train_file, self.test_file, self.valid_file = cfg.train_file, cfg.test_file, ""
        self.chosen: dict[str, str] = {}  # system -> the stage of its validation-chosen candidate (workflow.search)
        self.source = "pretrain" if cfg.world is not None and not cfg.base_model else "inputs"

    def mesh_(self) -> Any:
        """The run's mesh (built on first use from the mesh: section)."""
        if self.mesh is None:
            self.mesh = self.cfg.mesh.build()
        return self.mesh

    def backend_options(self, backend: str, options: dict[str, Any]) -> dict[str, Any]:
        """A backend's options with what the run supplies: the world backend reads the run's world."""
        if backend == "world" and "world" not in options:
            return {**options, "world": str(self.dir / "world" / "world.json")}
        return dict(options)

    def backend_settings(self) -> dict[str, Any]:
        """The knowledge backend's identity (part of stage keys; the world path is the run's, not a setting)."""
        return {"backend": self.cfg.knowledge.backend, "options": self.cfg.knowledge.backend_options}

    def backend(self) -> Any:
        """The knowledge backend, caching in the knowledge stage's sqlite cache."""
        from kt_jax.knowledge.registry import make_backend

        k = self.cfg.knowledge
        options = {"cache": k.cache or str(self.dir / "knowledge" / "knowledge_cache.sqlite3"), **k.backend_options}
        return make_backend(k.backend, **self.backend_options(k.backend, options))

    # -- data and base model -------------------------------------------------------------------------------
    def world(self) -> None:
        from kt_jax.world.generator import generate_world
        from kt_jax.world.render import write_world

        out = self.dir / "world"
        self.stages.run("world", lambda: {k: str(v) for k, v in write_world(generate_world(self.cfg.world),
                                                                                out).items()},
                        settings=self.cfg.world,
                        outputs=[out / "qa_train.json", out / "qa_valid.json", out / "qa_test.json"])
        self.train_file, self.test_file = str(out / "qa_train.json"), str(out / "qa_test.json")
        self.valid_file = str(out / "qa_valid.json")

    def pretrain(self) -> None:
        from kt_jax.world.generator import World
        from kt_jax.world.pretrain import WorldPreset, pretrain_world

        out = self.dir / "base"
        preset = WorldPreset(world=self.cfg.world, pretrain=self.cfg.pretrain)

        def run() -> dict[str, Any]:
            stats = pretrain_world(preset, out, world=World.load(self.dir / "world" / "world.json"), progress=True,
                                   mesh=self.mesh_())
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
        k = self.cfg.knowledge
        kcfg = dataclasses.replace(k, data=self.train_file, out=str(out), model=self.base_model,
                                   tokenizer=self.tokenizer, add_bos=self.cfg.sft.data.add_bos,
                                   backend_options=self.backend_options(k.backend, k.backend_options))
        dtype = self.cfg.sft.train.compute_dtype  # the model being tuned scores its facts in its compute dtype
        self.stages.run("knowledge", lambda: _brief(build_knowledge(kcfg, mesh=self.mesh_(), dtype=dtype)),
                        settings={"knowledge": _settings(dataclasses.replace(kcfg, backend_options=k.backend_options)),
                                  "dtype": dtype}, upstream=[self.source],
                        outputs=[out / "ka.jsonl", out / "kc.jsonl"],
                        scratch=[out / n for n in KNOWLEDGE_SCRATCH])  # never the backend's cache of paid calls

    def reference(self, name: str = "reference", pairs: str = "kc", upstream: str = "knowledge") -> str:
        """knowledge/<pairs>_ref.jsonl: the pairs + reference log-probs under the BASE model (the original's
        reference), computed once in the DPO reference dtype (dpo.dpo.reference_dtype: the policy's by default)."""
        from kt_jax.train.job import ReferenceSpec, reference_dtype

        src, out = self.dir / "knowledge" / f"{pairs}.jsonl", self.dir / "knowledge" / f"{pairs}_ref.jsonl"
        data = self.cfg.dpo.data
        spec = ReferenceSpec(model=self.base_model, lora="as_loaded", dtype=reference_dtype(self.cfg.dpo),
                             template=data.template, max_len=data.max_len, add_bos=data.add_bos)

        def run() -> dict[str, Any]:
            import jax.numpy as jnp

            from kt_jax.data.records import read_records
            from kt_jax.data.tokenizer import load_tokenizer
            from kt_jax.model.hf import load_pretrained
            from kt_jax.train.job import attach_reference_logps

            records, _ = read_records(src, "kc")
            model = load_pretrained(self.base_model, mesh=self.mesh_(), dtype=getattr(jnp, spec.dtype))
            done = attach_reference_logps(model, load_tokenizer(self.tokenizer), records, spec, self.mesh_(), out)
            return {"pairs": len(done), "dtype": spec.dtype}

        self.stages.run(name, run, settings=dataclasses.replace(spec, model=""), upstream=[upstream, self.source],
                        outputs=[out], scratch=[out.with_name(out.name + ".stamp.json")])
        return str(out)

    # -- training ------------------------------------------------------------------------------------------
    def tune(self, name: str, *, start: str | None, train_file: str, kind: str, upstream: list[str],
             tune_cfg: Any = None) -> str:
        """Train system `name` (train/<name>/) from the base model (`start` None) or from stage `start`'s result.

        Continuing a stage follows the original (LLaMA-Factory `--checkpoint_dir <start> --resume_lora_training`):
        when both stages train the same LoRA adapter (finetuning: lora and equal `lora` sections), the job loads the
        base model + `start`'s exported PEFT adapter and keeps training that adapter; otherwise (LoRA then full, full
        then LoRA, or a different adapter shape) it starts from `start`'s merged export (full fine-tuning of those
        weights, or a fresh adapter on them). DPO reference log-probs come from the `reference` stage (the base
        model) in every case. Returns the merged export directory.
        """
        from kt_jax.train.job import TrainJobConfig, run_training

        stage = tune_cfg or (self.cfg.dpo if kind == "kc" else self.cfg.sft)
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
        # A killed stage resumes from the latest checkpoint inside train/<name> (scratch: removed, never resumed,
        # when the stage's key changed).
        self.stages.run(name, lambda: {**_brief(run_training(job, mesh=self.mesh_())), "start": how}, scratch=[out],
                        settings={"tune": stage, "kind": kind, "init": start or self.source, "start": how},
                        upstream=[start or self.source, *upstream], outputs=outputs)
        return str(out / "export")

    def train_systems(self, systems: set[str]) -> dict[str, str]:
        """Train every system `systems` needs (and what they start from); returns name -> merged export."""
        from kt_jax.workflow import systems as extra
        from kt_jax.workflow.search import tune_chosen

        tune = lambda name, **kw: tune_chosen(self, name, **kw)

        kdir = self.dir / "knowledge"
        models = {"sft": tune("sft", start=None, train_file=self.train_file, kind="qa", upstream=[])}
        kc_systems = {"knowtuning", "no_ka", *extra.ABLATIONS}
        if ({"ka", "sft_steps"} | (kc_systems - {"no_ka"})) & systems:
            models["ka"] = tune("ka", start=None, train_file=str(kdir / "ka.jsonl"), kind="ka",
                                upstream=["knowledge"])
        if "sft_steps" in systems:
            steps = dataclasses.replace(self.cfg.sft.train, num_steps=extra.ka_steps(self))
            models["sft_steps"] = tune("sft_steps", start=None, train_file=self.train_file, kind="qa",
                                       upstream=["ka"], tune_cfg=dataclasses.replace(self.cfg.sft, train=steps))
        if kc_systems & systems:
            kc = self.reference()
            if "knowtuning" in systems:
                models["knowtuning"] = tune("knowtuning", start="ka", train_file=kc, kind="kc",
                                            upstream=["reference"])
            if "no_ka" in systems:
                models["no_ka"] = tune("no_ka", start="sft", train_file=kc, kind="kc", upstream=["reference"])
            for name in extra.ABLATIONS:
                if name in systems:
                    models[name] = tune(name, start="ka", train_file=extra.ablation_pairs(self, name),
                                        kind="kc", upstream=[f"pairs_{name}"])
        if set(extra.BASELINES) & systems:
            samples = extra.sample_answers(self, models["sft"])
            for method in extra.BASELINES:
                if method in systems:
                    extra.preference_pairs(self, method, samples)
                    pairs = self.reference(f"reference_{method}", pairs=method, upstream=f"pairs_{method}")
                    models[method] = tune(method, start="sft", train_file=pairs, kind="kc",
                                          upstream=[f"reference_{method}"])
        return models

    # -- generation and evaluation -------------------------------------------------------------------------
    def generate(self, name: str, model: str, upstream: list[str] | None = None, *, data: str | None = None,
                 split: str = "test") -> str:
        """predictions/<name>/predictions.jsonl: `model` answering the test questions (or predictions/valid/<name>:
        the validation questions, for the search)."""
        from kt_jax.inference.generate_file import generate_file

        out = self.dir / "predictions" / name if split == "test" else self.dir / "predictions" / split / name
        tmpl = self.cfg.sft.data
        gcfg = dataclasses.replace(self.cfg.generate, model=model, data=data or self.test_file, out=str(out),
                                   tokenizer=self.tokenizer, template=tmpl.template, add_bos=tmpl.add_bos)
        stage = f"generate_{name}" if split == "test" else f"{split}_{name}"
        self.stages.run(stage, lambda: _brief(generate_file(gcfg, mesh=self.mesh_())),
                        settings=_settings(gcfg), upstream=upstream or [self.chosen.get(name, name), self.source],
                        outputs=[out / "predictions.jsonl"], scratch=[out])
        return str(out / "predictions.jsonl")

    def evaluate(self, predictions: dict[str, str]) -> dict[str, Any]:
        """Text metrics (+ judge, facts) of every system; on a world also exact metrics, CIs and validity."""
        from kt_jax.eval.job import evaluate_files

        out = self.dir / "eval"
        backend = self.cfg.eval.backend
        ecfg = dataclasses.replace(self.cfg.eval, predictions=dict(predictions), out=str(out), baseline="sft",
                                   backend_options=self.backend_options(backend, self.cfg.eval.backend_options))
        self.stages.run("evaluate", lambda: _brief(evaluate_files(ecfg)),
                        settings=dataclasses.replace(self.cfg.eval, baseline="sft"),
                        upstream=[f"generate_{name}" for name in predictions],
                        outputs=[out / "metrics.json", out / "report.md"])
        metrics = json.loads((out / "metrics.json").read_text())
        if self.cfg.world is None:
            return {"metrics": metrics}
        from kt_jax.workflow.world_checks import world_report

        world = world_report(self, predictions, self.generate("base", self.base_model, upstream=[self.source]))
        for name, values in world["metrics"].items():
            metrics[name] = {**values, **metrics.get(name, {})}
        return {"metrics": metrics, "differences": world["differences"], "validity": world["validity"],
                "by_kind": world.get("by_kind")}

    # -- all -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every stage in order (skipping finished ones), holding the run directory's lock throughout."""
        import jax

        with RunLock(self.dir, jax.process_index()):
            return self._run()

    def _run(self) -> dict[str, Any]:
        from kt_jax import host_memory
        from kt_jax.plan import measured_matmul_gflops

        start = time.perf_counter()
        machine = {"matmul_gflops": round(measured_matmul_gflops(), 1), "backend": jax_backend(),
                   "host_malloc": host_memory.describe()}
        save_config(self.cfg, self.dir / "config.yaml")
        if self.source == "pretrain":
            self.world()
            self.pretrain()
        else:
            if self.cfg.world is not None:
                self.world()
            self.inputs()
        self.knowledge()
        models = self.train_systems(set(self.cfg.systems))
        predictions = {name: self.generate(name, models[name]) for name in self.cfg.systems}
        evaluated = self.evaluate(predictions)
        metrics = evaluated["metrics"]
        report = self.dir / "report.md"
        summary = {"run_dir": str(self.dir), "report": str(report), "seconds": time.perf_counter() - start,
                   "stages": [{"name": r.name, "skipped": r.skipped, "seconds": round(r.seconds, 1)}
                              for r in self.stages.results], "chosen": dict(self.chosen), "machine": machine,
                   **evaluated}
        if is_main_process():  # stage outputs exist on every worker's disk; the report and summary on process 0
            probe = getattr(self, "base_summary", None) or (self.stages.record("pretrain") or {}).get("summary")
            write_report(report, self.cfg.name, self.dir, metrics, probe, SYSTEM_LABELS,
                         validity=evaluated.get("validity"), differences=evaluated.get("differences"),
                         search=search_table(self.dir, self.chosen), timing={**machine, "seconds": summary["seconds"]},
                         by_kind=evaluated.get("by_kind"))
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def jax_backend() -> str:
    """The default backend and device count, e.g. "cpu x 1"."""
    import jax

    return f"{jax.default_backend()} x {jax.device_count()}"


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """What a stage record keeps of a library call's summary (no bulky config echoes)."""
    return {k: v for k, v in summary.items() if k not in ("config", "losses")}
