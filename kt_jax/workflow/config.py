"""`kt-jax run`'s config: the data source and one section per stage, each section the library's own config class.

The sections are the configs of the library calls the stages make (no copies): `knowledge` is a KnowledgeConfig,
`sft`/`dpo` are TuneConfigs, `generate` a GenerateConfig, `eval` an EvalConfig. The paths inside them (inputs,
outputs, models) are the run's to fill; setting one in a run config is an error.
"""

from __future__ import annotations

import dataclasses

from kt_jax.errors import ConfigError
from kt_jax.eval.job import EvalConfig
from kt_jax.inference.generate_file import GenerateConfig
from kt_jax.knowledge.job import KnowledgeConfig
from kt_jax.knowledge.preferences import PreferenceConfig
from kt_jax.sharding import MeshConfig
from kt_jax.train.job import TuneConfig
from kt_jax.workflow.search import SearchConfig
from kt_jax.world.generator import WorldConfig
from kt_jax.world.pretrain import PretrainConfig

SYSTEMS = ("sft", "ka", "knowtuning", "no_ka", "no_kcc", "no_kfc", "no_klc", "rlaif", "facttune", "sft_steps")
SYSTEM_LABELS = {"sft": "SFT", "ka": "KA-SFT (-KC)", "knowtuning": "KnowTuning", "no_ka": "-KA (DPO from SFT)",
                 "no_kcc": "-KCC (no completeness pairs)", "no_kfc": "-KFC (no factuality pairs)",
                 "no_klc": "-KLC (no logicality pairs)", "rlaif": "RLAIF (DPO from SFT)",
                 "facttune": "FactTune (DPO from SFT)", "sft_steps": "SFT (KA-SFT's steps)", "base": "base model"}
RUN_FILLED = {"knowledge": ("data", "out", "model", "tokenizer", "add_bos"),
              "generate": ("model", "data", "out", "tokenizer", "template", "add_bos"),
              "eval": ("predictions", "out", "baseline")}  # prompts follow sft.data.template / sft.data.add_bos


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
    knowledge: KnowledgeConfig = dataclasses.field(default_factory=KnowledgeConfig)
    sft: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    dpo: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    preferences: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)  # rlaif / facttune: k, ...
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)  # hyperparameters chosen on validation
    seeds: tuple[int, ...] = ()  # several seeds of a world run, one report over them (workflow.replicate)

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
        for section, keys in RUN_FILLED.items():
            default = type(getattr(self, section))()
            for key in keys:
                if getattr(getattr(self, section), key) != getattr(default, key):
                    raise ConfigError(f"{section}.{key}: set by kt-jax run (from train_file/test_file/base_model and "
                                      "the run directory); remove it from the config")
        if self.search.candidates and (self.world is None or not self.world.valid_fraction):
            raise ConfigError("search: choosing hyperparameters needs validation entities (a world with "
                              "world.valid_fraction > 0)")
        if self.seeds and (self.world is None or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds: {list(self.seeds)}: distinct seeds of a config with a world section")
        self.search.section_configs("sft", self.sft)  # a bad key fails here, not after pretraining
        self.search.section_configs("dpo", self.dpo)
        self.sft.validate()
        self.dpo.validate()
