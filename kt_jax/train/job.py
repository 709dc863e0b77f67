"""One SFT or DPO run: typed config -> model (+LoRA) -> data -> reference log-probs -> train -> export.

Output directory: `config.yaml` (resolved), `metrics.jsonl`, `tb/`, `checkpoints/{latest,best}/`,
`kc_with_ref.jsonl` (DPO: the pairs with their reference log-probs, computed once, stamped with the model that
computed them, in the policy's compute dtype unless `dpo.reference_dtype: float32`), `export/` (HF directory, LoRA
merged; the last step's weights, or the best-eval checkpoint's with `train.export_weights: best`), `export/adapter/`
(LoRA runs: the adapter alone in PEFT's format, `kt_jax.model.peft`), `summary.json`. The held-out rows
(`train.eval_rows`) are whole questions (`split_eval`). Running the same config again resumes from the latest
checkpoint; a different config refuses to touch another config's checkpoints.

`init_adapter` (a PEFT adapter directory, e.g. a KA run's `export/adapter`) starts LoRA from that adapter on `model`
(its base) instead of a fresh zero-B one: the adapter itself keeps training (LLaMA-Factory's
`--checkpoint_dir ... --resume_lora_training`). Its rank, alpha and targets must equal `lora`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kt_jax.config import config_hash, save_config, to_dict
from kt_jax.data.batch import Task
from kt_jax.data.loader import DataConfig
from kt_jax.errors import ConfigError, DataError
from kt_jax.model.lora import LoRAConfig
from kt_jax.sharding import MeshConfig
from kt_jax.train.config import DPOConfig, OptimConfig, TrainConfig

KIND_TASK = {"qa": Task.SFT, "ka": Task.SFT, "kc": Task.DPO}  # record kind of the train file -> objective


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How to fine-tune (no paths): the `sft:` / `dpo:` sections of `kt-jax run`, and the body of a train job."""

    finetuning: str = "lora"  # lora | full
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.finetuning not in ("lora", "full"):
            raise ConfigError(f"finetuning: {self.finetuning!r} is not one of ['lora', 'full']")
        if self.finetuning == "lora":
            self.lora.validate()
        self.train.validate()
        self.optim.validate()
        self.dpo.validate()


@dataclasses.dataclass(frozen=True)
class TrainJobConfig(TuneConfig):
    """`kt-jax sft` / `kt-jax dpo`: a TuneConfig plus the paths, the record kind and the mesh (YAML + overrides)."""

    model: str = ""
    train_file: str = ""
    output_dir: str = ""
    tokenizer: str | None = None
    kind: str = "ka"  # record kind of train_file: qa | ka (SFT) or kc (DPO)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    export: bool = True
    init_adapter: str | None = None  # PEFT adapter directory the LoRA training starts from (finetuning: lora)

    @classmethod
    def of(cls, tune: TuneConfig, **paths: Any) -> TrainJobConfig:
        """The job that runs `tune` with these paths/kind/mesh."""
        return cls(**{f.name: getattr(tune, f.name) for f in dataclasses.fields(TuneConfig)}, **paths)

    @property
    def task(self) -> Task:
        return KIND_TASK[self.kind]

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        for key in ("model", "train_file", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required")
        if self.kind not in KIND_TASK:
            raise ConfigError(f"kind: {self.kind!r} is not one of {sorted(KIND_TASK)}")
        if self.init_adapter and self.finetuning != "lora":
            raise ConfigError(f"init_adapter: a LoRA adapter needs finetuning: lora, not {self.finetuning!r} (for full "
                              "fine-tuning from an adapted model, pass the merged export as model)")
        super().validate()


def question_key(record: Any) -> str:
    """The question a record belongs to (a rewritten KA pair belongs to its source question)."""
    return getattr(record, "source_question", None) or record.question


def split_eval(records: list[Any], eval_rows: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) split by question: whole questions, in a seeded order, while the held-out rows stay within
    min(eval_rows, 10% of the rows); a question's rows are never on both sides. eval_rows = 0: no split."""
    n_eval = min(eval_rows, len(records) // 10)
    if n_eval <= 0:
        return list(records), []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(question_key(r), []).append(i)
    keys = list(groups)
    held: set[int] = set()
    for k in np.random.default_rng(seed).permutation(len(keys)):
        rows = groups[keys[k]]
        if len(held) + len(rows) <= n_eval:
            held.update(rows)
        if len(held) == n_eval:
            break
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def reference_dtype(tune: TuneConfig) -> str:
    """The compute dtype reference log-probs are computed in: the policy's (dpo.reference_dtype: policy) or float32."""
    return tune.train.compute_dtype if tune.dpo.reference_dtype == "policy" else "float32"


def count_batches(records: list[Any], tok: Any, cfg: DataConfig, task: Task) -> int:
    """Host batches in one epoch of `records` (tokenizes them once)."""
    from kt_jax.data.loader import make_dataset

    it = iter(make_dataset(records, tok, dataclasses.replace(cfg, num_epochs=1), task=task))
    return sum(1 for _ in it)


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """What determines reference log-probs: the model (path, LoRA on/off, compute dtype) and the prompt build."""

    model: str
    lora: str  # "disabled" (the base model under the adapters) | "as_loaded" (the weights as loaded, adapters too)
    dtype: str
    template: str
    max_len: int
    adapter: str = ""  # the adapter loaded on `model` when it is part of the reference (lora: as_loaded)
    add_bos: bool = True  # BOS before the prompt, as the training data (`data.add_bos`)


def attach_reference_logps(model: Any, tok: Any, records: list[Any], spec: ReferenceSpec, mesh: Any,
                           out_path: Path) -> list[Any]:
    """KC records with `ref_*_logp` filled by one scoring pass of `model` (reused when `out_path` has them).

    `out_path` is stamped with `spec`: pairs scored by another model, dtype or prompt are computed again.
    """
    from kt_jax.data.records import read_records, write_records
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.inference.scoring import sequence_logprobs
    from kt_jax.model.lora import lora_disabled

    stamp_path = out_path.with_name(out_path.name + ".stamp.json")
    stamp = to_dict(spec)
    if out_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        cached, _ = read_records(out_path, "kc")
        if len(cached) == len(records) and all(
                (a.question, a.input, a.chosen, a.rejected) == (b.question, b.input, b.chosen, b.rejected)
                for a, b in zip(cached, records, strict=True)):
            return cached
    todo = [i for i, r in enumerate(records) if r.ref_chosen_logp is None or r.ref_rejected_logp is None]
    if not todo:  # the input carries them (e.g. `kt-jax run`'s reference stage): kept as given, no stamp
        write_records(out_path, records)
        return records
    pairs = []
    for i in todo:
        prompt = alpaca_prompt(records[i].question, records[i].input, spec.template)
        pairs += [(prompt, records[i].chosen), (prompt, records[i].rejected)]
    if spec.lora == "disabled":
        with lora_disabled(model):
            scores = sequence_logprobs(model, tok, pairs, max_len=spec.max_len, add_bos=spec.add_bos, mesh=mesh,
                                       progress=True)
    else:
        scores = sequence_logprobs(model, tok, pairs, max_len=spec.max_len, add_bos=spec.add_bos, mesh=mesh,
                                   progress=True)
    records = list(records)
    for j, i in enumerate(todo):
        records[i] = dataclasses.replace(records[i], ref_chosen_logp=scores[2 * j][0],
                                         ref_rejected_logp=scores[2 * j + 1][0])
    write_records(out_path, records)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return records


def _float32_reference(cfg: TrainJobConfig, policy: Any, mesh: Any) -> Any:
    """A float32-compute copy of what the reference scores: the base model (dpo.reference: base, loaded again in
    float32) or the initial policy (its weights, adapters included, under float32 compute)."""
    import jax.numpy as jnp
    from flax import nnx

    from kt_jax.model.hf import load_pretrained
    from kt_jax.model.lora import apply_lora

    base = cfg.dpo.reference == "base"
    ref = load_pretrained(cfg.model, mesh=mesh, dtype=jnp.float32,
                          param_dtype=jnp.float32 if base else getattr(jnp, cfg.train.param_dtype),
                          attention=cfg.train.attention)
    if not base:
        if cfg.finetuning == "lora":
            apply_lora(ref, cfg.lora, seed=cfg.train.seed)
        nnx.update(ref, nnx.state(policy))
    return ref


def _check_output_dir(cfg: TrainJobConfig, run_dir: Path) -> None:
    """Refuse to resume another config's checkpoints; record this config."""
    stamp = run_dir / "config.hash"
    if stamp.exists() and stamp.read_text().strip() != config_hash(cfg) and (
            run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(f"{run_dir / 'config.yaml'}: {run_dir} holds checkpoints of a different config; use a new "
                          "output_dir")
    save_config(cfg, run_dir / "config.yaml")
    stamp.write_text(config_hash(cfg) + "\n")


def run_training(cfg: TrainJobConfig, *, mesh: Any = None, on_step: Callable[[int], None] | None = None
                 ) -> dict[str, Any]:
    """Train per `cfg` on `mesh` (default: cfg.mesh): SFT for qa/ka records, DPO for kc; returns summary.json."""
    import jax
    import jax.numpy as jnp

    from kt_jax.data.loader import make_dataset
    from kt_jax.data.records import read_records
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.model.hf import load_pretrained, save_pretrained
    from kt_jax.model.lora import apply_lora, merge_lora
    from kt_jax.sharding import batch_axis_size
    from kt_jax.train.loop import train
    from kt_jax.train.optimizer import lr_schedule, make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_dpo_loss, make_eval_step, make_sft_loss, make_train_step

    cfg.validate()
    if cfg.init_adapter:
        from kt_jax.model.peft import check_adapter_config

        check_adapter_config(cfg.init_adapter, cfg.lora)  # before loading anything
    task = cfg.task
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_output_dir(cfg, run_dir)
    mesh = mesh if mesh is not None else cfg.mesh.build()
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    records, report = read_records(cfg.train_file, cfg.kind)
    if not records:
        raise DataError(f"{cfg.train_file}: no records")
    model = load_pretrained(cfg.model, mesh=mesh, dtype=getattr(jnp, cfg.train.compute_dtype),
                            param_dtype=getattr(jnp, cfg.train.param_dtype), remat=cfg.train.remat,
                            attention=cfg.train.attention)
    if cfg.finetuning == "lora":
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
        if cfg.init_adapter:
            from kt_jax.model.peft import load_adapter

            load_adapter(model, cfg.init_adapter)
    if task is Task.DPO:
        as_loaded = cfg.dpo.reference == "initial_policy"
        spec = ReferenceSpec(model=str(Path(cfg.model).resolve()), lora="as_loaded" if as_loaded else "disabled",
                             dtype=reference_dtype(cfg), template=cfg.data.template, max_len=cfg.data.max_len,
                             adapter=str(Path(cfg.init_adapter).resolve()) if as_loaded and cfg.init_adapter else "",
                             add_bos=cfg.data.add_bos)
        scorer = model if spec.dtype == cfg.train.compute_dtype else _float32_reference(cfg, model, mesh)
        records = attach_reference_logps(scorer, tok, records, spec, mesh, run_dir / "kc_with_ref.jsonl")
        del scorer
    train_recs, eval_recs = split_eval(records, cfg.train.eval_rows, cfg.train.seed)
    if task is Task.DPO and cfg.data.group_preferences:  # grouped rows must split over the mesh's batch ways
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, row_multiple=max(1, batch_axis_size(mesh) // jax.process_count())))
    per_epoch = count_batches(train_recs, tok, cfg.data, task)
    if per_epoch == 0:
        raise DataError(f"{cfg.train_file}: no training batch: every row was skipped (longer than data.max_len="
                        f"{cfg.data.max_len} under data.overlength={cfg.data.overlength!r})")
    total = cfg.train.num_steps or max(1, math.floor(cfg.train.num_epochs * per_epoch / cfg.train.grad_accum))
    data_cfg = dataclasses.replace(cfg.data, num_epochs=None)  # the step count ends the run
    data = iter(make_dataset(train_recs, tok, data_cfg, task=task))
    eval_cfg = dataclasses.replace(cfg.data, shuffle=False, num_epochs=1)
    eval_data = (lambda: iter(make_dataset(eval_recs, tok, eval_cfg, task=task))) if eval_recs else None
    tx = make_optimizer(cfg.optim, total)
    ts = create_state(model, tx, mesh)
    loss_fn = make_dpo_loss(cfg.dpo, cfg.train.chunk_size) if task is Task.DPO else make_sft_loss(cfg.train.chunk_size)
    result = train(ts, make_train_step(ts, tx, loss_fn), data, cfg=cfg.train, total_steps=total, run_dir=run_dir,
                   mesh=mesh, eval_step=make_eval_step(ts, loss_fn), eval_data=eval_data,
                   lr_fn=lr_schedule(cfg.optim, total), on_step=on_step)
    summary: dict[str, Any] = {
        "mode": task.name.lower(), "finetuning": cfg.finetuning, "steps": result.steps,
        "total_steps": total, "resumed_from": result.resumed_from, "train_rows": len(train_recs),
        "eval_rows": len(eval_recs), "records": report.summary(), "trainable_params": ts.num_trainable(),
        "last": result.last_metrics, "best_step": result.best_step, "best_eval_loss": result.best_eval_loss,
        "seconds": result.seconds, "tokens": result.tokens, "devices": jax.device_count(),
        "config": to_dict(cfg)}
    if cfg.export:
        from kt_jax.train.checkpoint import Checkpoints

        best = cfg.train.export_weights == "best" and result.best_step is not None
        summary["export_weights"], summary["export_step"] = cfg.train.export_weights, (
            result.best_step if best else result.steps)
        if best:
            ck = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
            ck.restore_best(ts)
            ck.close()
        if ts.lora:
            from kt_jax.model.peft import save_adapter

            save_adapter(ts.model(), run_dir / "export" / "adapter", cfg.lora, base_model=cfg.model)
            summary["adapter"] = str(run_dir / "export" / "adapter")
        exported = merge_lora(ts.model()) if ts.lora else ts.model()
        save_pretrained(exported, run_dir / "export", copy_tokenizer_from=cfg.tokenizer or cfg.model)
        summary["export"] = str(run_dir / "export")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
