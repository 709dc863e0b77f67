"""KnowTuning end to end as resumable stages in one run directory (`kt-jax run --config ...`).

Stages (each skipped when its outputs exist for the same settings and inputs):
world -> pretrain (when the config has a world) -> knowledge (extract, score with the base model, KA, KC)
-> reference (DPO reference log-probs of every KC pair under the BASE model, computed once)
-> sft (baseline on the original QA) -> ka (KA-SFT) -> knowtuning (DPO+NLL from the KA weights)
-> no_ka (ablation: DPO from the SFT weights) -> generate (each system on the test split) -> evaluate -> report.
The KnowTuning system without KC is the KA-SFT model itself (`ka`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kt_jax.config import save_config, to_dict
from kt_jax.distributed import is_main_process
from kt_jax.errors import ConfigError
from kt_jax.runlock import RunLock
from kt_jax.runner import Runner
from kt_jax.sharding import MeshConfig
from kt_jax.train.job import TuneConfig
from kt_jax.world.generator import WorldConfig
from kt_jax.world.pretrain import PretrainConfig

SYSTEMS = ("sft", "ka", "knowtuning", "no_ka")
SYSTEM_LABELS = {"sft": "SFT", "ka": "KA-SFT (-KC)", "knowtuning": "KnowTuning", "no_ka": "-KA (DPO from SFT)"}


@dataclasses.dataclass(frozen=True)
class KnowledgeStage:
    """How the KA and KC sets are built (the `kt-jax knowledge` settings that matter to the method)."""

    backend: str = "offline"
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    alpha: float = 0.5
    beta: float = 0.5
    revise_ratio: float = 1.0
    combine: str = "concat"
    workers: int = 4
    limit: int | None = None
    max_len: int = 1024


@dataclasses.dataclass(frozen=True)
class GenerateStage:
    preset: str = "knowtuning"  # knowtuning (T 0.95, top-p 0.7, top-k 50) | greedy
    max_new_tokens: int | None = None
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalStage:
    bertscore: bool = False
    judge: bool = False  # pairwise LLM judge vs the SFT baseline (the knowledge backend)
    facts: bool = False  # fine-grained fact extraction + verification (the knowledge backend)
    backend: str = "offline"
    backend_options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """`kt-jax run` config: data source (a generated world, or QA files + a HF base model) and every stage."""

    name: str = "run"
    run_dir: str = ""  # default: runs/<name>
    world: WorldConfig | None = None
    pretrain: PretrainConfig | None = None
    train_file: str = ""  # alpaca QA (when there is no world)
    test_file: str = ""
    base_model: str = ""  # HF Llama directory (when there is no world)
    tokenizer: str = ""  # default: the base model's directory
    systems: tuple[str, ...] = ("sft", "ka", "knowtuning")
    knowledge: KnowledgeStage = dataclasses.field(default_factory=KnowledgeStage)
    sft: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    dpo: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    generate: GenerateStage = dataclasses.field(default_factory=GenerateStage)
    eval: EvalStage = dataclasses.field(default_factory=EvalStage)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the bad key."""
        bad = sorted(set(self.systems) - set(SYSTEMS))
        if bad:
            raise ConfigError(f"systems: unknown {bad}; choose from {list(SYSTEMS)}")
        if "sft" not in self.systems:
            raise ConfigError("systems: 'sft' (the baseline every system is compared with) is required")
        if self.world is None:
            missing = [k for k in ("train_file", "test_file", "base_model") if not getattr(self, k)]
            if missing:
                raise ConfigError(f"{', '.join(missing)}: required when the config has no world section")
        elif self.pretrain is None and not self.base_model:
            raise ConfigError("pretrain: a world needs a pretrain section (or a base_model trained on its corpus)")


def _tune_config(stage: TuneConfig, cfg: PipelineConfig, *, model: str, tokenizer: str, train_file: str,
                 output_dir: Path, kind: str) -> Any:
    from kt_jax.train.job import TrainJobConfig

    return TrainJobConfig.of(stage, model=model, tokenizer=tokenizer, train_file=train_file,
                             output_dir=str(output_dir), kind=kind, mesh=cfg.mesh)


def _invoke(command: str, argv: list[str]) -> None:
    """Run a `kt-jax` subcommand in-process with these arguments (the same code path users run)."""
    import argparse
    import importlib

    from kt_jax.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"kt-jax {command}")
    module.add_arguments(parser)
    code = module.run(parser.parse_args(argv))
    if code:
        raise RuntimeError(f"kt-jax {command} exited with {code}")


def _mesh_argv(mesh: MeshConfig) -> list[str]:
    return ["--mesh-data", str(mesh.data), "--mesh-fsdp", str(mesh.fsdp), "--mesh-tensor", str(mesh.tensor)]


class Pipeline:
    """The stages of one `kt-jax run`, wired through files in the run directory."""

    def __init__(self, cfg: PipelineConfig):
        cfg.validate()
        self.cfg = cfg
        self.runner = Runner(cfg.run_dir or f"runs/{cfg.name}")
        self.dir = self.runner.run_dir
        self.base_model = cfg.base_model
        self.tokenizer = cfg.tokenizer or cfg.base_model
        self.train_file, self.test_file = cfg.train_file, cfg.test_file

    # -- data and base model -------------------------------------------------------------------------------
    def world(self) -> None:
        from kt_jax.world.generator import generate_world
        from kt_jax.world.render import write_world

        out = self.dir / "world"
        self.runner.stage("world", lambda: {k: str(v) for k, v in write_world(generate_world(self.cfg.world),
                                                                                 out).items()},
                          params=self.cfg.world, outputs=[out / "qa_train.json", out / "qa_test.json"])
        self.train_file, self.test_file = str(out / "qa_train.json"), str(out / "qa_test.json")

    def pretrain(self) -> None:
        from kt_jax.world.generator import World
        from kt_jax.world.pretrain import WorldPreset, pretrain_world

        out = self.dir / "base"
        preset = WorldPreset(world=self.cfg.world, pretrain=self.cfg.pretrain)

        def run() -> dict[str, Any]:
            stats = pretrain_world(preset, out, world=World.load(self.dir / "world" / "world.json"), progress=True)
            return {k: v for k, v in stats.items() if k != "losses"}

        result = self.runner.stage("pretrain", run, params=preset, inputs=[self.dir / "world" / "world.json"],
                                   outputs=[out / "model" / "config.json", out / "pretrain.json"])
        self.base_model = self.tokenizer = str(out / "model")
        self.base_summary = result.summary

    # -- knowledge -----------------------------------------------------------------------------------------
    def knowledge(self) -> None:
        from kt_jax.commands.knowledge import KnowledgeConfig

        k = self.cfg.knowledge
        out = self.dir / "knowledge"
        kcfg = KnowledgeConfig(data=self.train_file, out=str(out), backend=k.backend,
                               backend_options=dict(k.backend_options), limit=k.limit, workers=k.workers,
                               alpha=k.alpha, scorer="model", model=self.base_model, tokenizer=self.tokenizer,
                               max_len=k.max_len, beta=k.beta, revise_ratio=k.revise_ratio, combine=k.combine,
                               seed=self.cfg.sft.train.seed)

        def run() -> None:
            out.mkdir(parents=True, exist_ok=True)
            save_config(kcfg, out / "knowledge_input.yaml")
            _invoke("knowledge", ["all", "--config", str(out / "knowledge_input.yaml")])

        self.runner.stage("knowledge", run, params=kcfg, inputs=[self.train_file, self.base_model],
                          outputs=[out / "ka.jsonl", out / "kc.jsonl"])

    def reference(self) -> None:
        """KC pairs + reference log-probs under the base model (the original's reference), computed once."""
        out = self.dir / "knowledge" / "kc_ref.jsonl"
        tune = _tune_config(self.cfg.dpo, self.cfg, model=self.base_model, tokenizer=self.tokenizer,
                            train_file=str(self.dir / "knowledge" / "kc.jsonl"), output_dir=self.dir / "train",
                            kind="kc")
        tune = dataclasses.replace(tune, dpo=dataclasses.replace(tune.dpo, reference="init"))

        def run() -> dict[str, Any]:
            import jax.numpy as jnp

            from kt_jax.data.records import read_records
            from kt_jax.data.tokenizer import load_tokenizer
            from kt_jax.model.hf import load_pretrained
            from kt_jax.sharding import make_mesh
            from kt_jax.train.job import ReferenceSpec, attach_reference_logps

            mesh = make_mesh(self.cfg.mesh.data, self.cfg.mesh.fsdp, self.cfg.mesh.tensor)
            records, _ = read_records(tune.train_file, "kc")
            model = load_pretrained(self.base_model, mesh=mesh, dtype=jnp.float32)
            spec = ReferenceSpec(model=self.base_model, adapters="on", dtype="float32", template=tune.data.template,
                                 max_len=tune.data.max_len)
            done = attach_reference_logps(model, load_tokenizer(self.tokenizer), records, spec, mesh, out)
            return {"pairs": len(done)}

        self.runner.stage("reference", run, params={"data": tune.data, "base": self.base_model},
                          inputs=[tune.train_file, self.base_model], outputs=[out])

    # -- training ------------------------------------------------------------------------------------------
    def tune(self, name: str, *, init: str, train_file: str, kind: str) -> str:
        from kt_jax.train.job import run_training

        stage = self.cfg.dpo if kind == "kc" else self.cfg.sft
        out = self.dir / "train" / name
        tune = _tune_config(stage, self.cfg, model=init, tokenizer=self.tokenizer, train_file=train_file,
                            output_dir=out, kind=kind)
        # Trained by the stage: a killed run resumes from the latest checkpoint inside train/<name>.
        self.runner.stage(name, lambda: run_training(tune), params=to_dict(tune),
                          inputs=[train_file, init], outputs=[out / "export" / "config.json"])
        return str(out / "export")

    # -- generation and evaluation -------------------------------------------------------------------------
    def generate(self, name: str, model: str) -> str:
        g = self.cfg.generate
        out = self.dir / "predictions" / name
        argv = ["--model", model, "--tokenizer", self.tokenizer, "--data", self.test_file, "--out", str(out),
                "--preset", g.preset, "--seed", str(g.seed), "--batch-size", str(g.batch_size),
                "--template", self.cfg.sft.data.template, *_mesh_argv(self.cfg.mesh)]
        if g.max_new_tokens is not None:
            argv += ["--max-new-tokens", str(g.max_new_tokens)]
        if g.limit is not None:
            argv += ["--limit", str(g.limit)]
        pred = out / "predictions.jsonl"
        self.runner.stage(f"generate_{name}", lambda: _invoke("generate", argv), params=argv,
                          inputs=[model, self.test_file], outputs=[pred])
        return str(pred)

    def evaluate(self, predictions: dict[str, str]) -> dict[str, Any]:
        e = self.cfg.eval
        out = self.dir / "eval"
        argv = ["--out", str(out), "--baseline", "sft", "--backend", e.backend]
        argv += [a for name, path in predictions.items() for a in ("--predictions", f"{name}={path}")]
        argv += [] if e.bertscore else ["--no-bertscore"]
        argv += (["--judge"] if e.judge else []) + (["--facts"] if e.facts else [])
        argv += [a for k, v in e.backend_options.items() for a in ("--backend-option", f"{k}={v}")]
        self.runner.stage("evaluate", lambda: _invoke("eval", argv), params=argv, inputs=list(predictions.values()),
                          outputs=[out / "metrics.json", out / "report.md"])
        metrics = json.loads((out / "metrics.json").read_text())
        if self.cfg.world is not None:
            self.runner.stage("world_metrics", lambda: self._world_metrics(predictions), params=sorted(predictions),
                              inputs=[*predictions.values(), self.dir / "world" / "questions.jsonl"],
                              outputs=[out / "world_metrics.json"])
            for name, values in json.loads((out / "world_metrics.json").read_text()).items():
                metrics[name] = {**values, **metrics.get(name, {})}
        return metrics

    def _world_metrics(self, predictions: dict[str, str]) -> None:
        from kt_jax.commands.eval import load_predictions
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
        if self.cfg.world is not None:
            self.world()
            if self.cfg.pretrain is not None and not self.cfg.base_model:
                self.pretrain()
        self.knowledge()
        systems = self.cfg.systems
        models: dict[str, str] = {}
        original = self.train_file
        kdir = self.dir / "knowledge"
        models["sft"] = self.tune("sft", init=self.base_model, train_file=original, kind="qa")
        if {"ka", "knowtuning"} & set(systems):
            models["ka"] = self.tune("ka", init=self.base_model, train_file=str(kdir / "ka.jsonl"), kind="ka")
        if {"knowtuning", "no_ka"} & set(systems):
            self.reference()
            kc = str(kdir / "kc_ref.jsonl")
            if "knowtuning" in systems:
                models["knowtuning"] = self.tune("knowtuning", init=models["ka"], train_file=kc, kind="kc")
            if "no_ka" in systems:
                models["no_ka"] = self.tune("no_ka", init=models["sft"], train_file=kc, kind="kc")
        predictions = {name: self.generate(name, models[name]) for name in systems}
        metrics = self.evaluate(predictions)
        report = self.dir / "report.md"
        summary = {"run_dir": str(self.dir), "report": str(report), "seconds": time.perf_counter() - start,
                   "stages": [{"name": r.name, "skipped": r.skipped, "seconds": round(r.seconds, 1)}
                              for r in self.runner.results], "metrics": metrics}
        if is_main_process():  # stage outputs exist on every worker's disk; the report and summary on process 0
            self.write_report(metrics)
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def write_report(self, metrics: dict[str, dict[str, float]]) -> Path:
        """report.md: every system's exact world metrics (if any) and text metrics, side by side."""
        keys = [k for k in ("completeness", "factuality", "logicality", "recall_micro", "hallucinated_per_answer",
                            "meteor", "rouge_l", "bertscore_f1") if any(k in m for m in metrics.values())]
        lines = [f"# KnowTuning run: {self.cfg.name}", "",
                 f"Run directory: `{self.dir}`; detailed evaluation: `eval/report.md`.", ""]
        probe = getattr(self, "base_summary", None) or self._stage_summary("pretrain")
        if probe and "probe" in probe:
            p = probe["probe"]
            lines += [f"Base model ({probe.get('num_params', 0) / 1e6:.2f}M params) recall on the test entities "
                      f"before fine-tuning: completeness {p['completeness']:.3f}, factuality "
                      f"{p['factuality']:.3f}.", ""]
        lines += ["| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in metrics.items():
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "" for k in keys]
            lines.append(f"| {SYSTEM_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
        path = self.dir / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _stage_summary(self, name: str) -> dict[str, Any] | None:
        marker = self.dir / "stages" / f"{name}.json"
        return json.loads(marker.read_text()).get("summary") if marker.exists() else None
