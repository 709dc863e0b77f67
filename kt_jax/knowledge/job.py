"""Build the knowledge sets of a QA file: facts, their perplexities, KA and KC, in one output directory.

Outputs in `out`: `facts.jsonl` (per row: facts or the rejection reason), `scored.jsonl` (+ perplexities, reused while
the facts and the scorer stay the same: `scored.meta.json` holds their stamp), `ka.jsonl` / `ka.json` (alpaca rows
with provenance), `kc.jsonl` / `kc.json` (LLaMA-Factory ranking rows `output: [chosen, rejected]` with `aspect`),
`rejects_<stage>.jsonl` (every item that failed, with its reason), `knowledge_config.yaml` (the resolved config) and
`summary_<stage>.json`. Every backend call is cached in `cache` (default `<out>/knowledge_cache.sqlite3`) before it is
used, so a killed run resumes where it stopped and a finished one re-runs with zero backend calls. Secrets never
enter the config: the Anthropic key is read from `api_key_env`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kt_jax.config import save_config, to_dict
from kt_jax.data.records import RecordPolicy, read_records, read_rows, to_row, write_rows
from kt_jax.data.resumable import ResumableJsonl
from kt_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from jax.sharding import Mesh

STAGES = ("extract", "augment", "compare", "all")


@dataclasses.dataclass(frozen=True)
class KnowledgeConfig:
    """Settings of the knowledge sets (`kt-jax knowledge`, YAML + dotted overrides; the run's knowledge stage)."""

    data: str = ""                       # alpaca QA file (.json / .jsonl / .parquet / saved HF dataset)
    out: str = ""                        # run directory
    backend: str = "offline"             # offline | anthropic
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # model, base_url, batch, prices...
    cache: str = ""                      # sqlite cache path ("" = <out>/knowledge_cache.sqlite3)
    limit: int | None = None             # only the first N rows
    workers: int = 4                     # concurrent backend calls
    alpha: float = 0.5                   # KA: share of facts (highest perplexity) rewritten
    scorer: str = "model"                # model (inference.scoring fact perplexity) | file | lexical (model-free)
    scores: str = ""                     # scorer=file: a `kt-jax score` output of facts.jsonl (rows with ppl)
    model: str = ""                      # HF Llama directory for the model scorer
    tokenizer: str = ""                  # tokenizer path ("" = the model directory)
    max_len: int = 1024                  # scorer: max tokens of question + fact
    add_bos: bool = True                 # scorer: BOS before the prompt (as the SFT data's add_bos)
    beta: float = 0.5                    # KC: share of facts deleted for the completeness pair
    revise_ratio: float = 1.0            # KC: share of facts replaced by their false revision
    combine: str = "concat"              # KC rejected text: concat (original method) | llm
    seed: int = 0                        # KC deletion / shuffle randomness
    rounding: str = "figure"             # figure: KA keeps ceil(alpha*n), KC deletes floor(beta*n) | floor_round

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        from kt_jax.knowledge.registry import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {', '.join(sorted(BACKENDS))}")
        secret = [k for k in self.backend_options if "key" in k.lower() and k != "api_key_env"]
        if secret:
            raise ConfigError(f"backend_options.{secret[0]}: secrets are not allowed in configs; set an "
                              "environment variable and name it with backend_options.api_key_env")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha: must be in (0, 1], got {self.alpha}")
        if not 0 < self.beta < 1:
            raise ConfigError(f"beta: must be in (0, 1), got {self.beta}")
        if not 0 < self.revise_ratio <= 1:
            raise ConfigError(f"revise_ratio: must be in (0, 1], got {self.revise_ratio}")
        if self.scorer not in ("model", "file", "lexical"):
            raise ConfigError(f"scorer: {self.scorer!r} is not one of model, file, lexical")
        if self.scorer == "file" and not self.scores:
            raise ConfigError("scores: scorer=file needs the path of a `kt-jax score` output")
        if self.combine not in ("concat", "llm"):
            raise ConfigError(f"combine: {self.combine!r} is not one of concat, llm")
        if self.rounding not in ("figure", "floor_round"):
            raise ConfigError(f"rounding: {self.rounding!r} is not one of figure, floor_round")


@dataclasses.dataclass
class _Job:
    """One build_knowledge call: its config, directory, backend, scorer placement and running statistics."""

    cfg: KnowledgeConfig
    out: Path
    backend: Any
    mesh: Mesh | None
    dtype: str
    progress: bool
    stats: Counter = dataclasses.field(default_factory=Counter)

    def bar(self, total: int, desc: str) -> Any:
        """A progress bar (silent unless progress)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="item", leave=False, disable=not self.progress)


def _scorer(job: _Job, rows: list[dict[str, Any]]) -> Any:
    """The fact scorer the config names; the model scorer runs on the job's mesh in its dtype."""
    from kt_jax.knowledge.augment import file_scorer, lexical_scorer, model_scorer

    cfg = job.cfg
    if cfg.scorer == "lexical":
        return lexical_scorer([r["answer"] for r in rows])
    if cfg.scorer == "file":
        return file_scorer(cfg.scores)
    if not cfg.model:
        raise ConfigError("model: the model scorer needs a HF model directory (or set scorer=lexical)")
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.model.hf import load_pretrained

    model = load_pretrained(cfg.model, mesh=job.mesh, dtype=job.dtype)
    return model_scorer(model, load_tokenizer(cfg.tokenizer or cfg.model), max_len=cfg.max_len, mesh=job.mesh,
                        add_bos=cfg.add_bos, progress=job.progress)


def _extract(job: _Job) -> list[dict[str, Any]]:
    """facts.jsonl and rejects_extract.jsonl from the QA file."""
    from kt_jax.knowledge.augment import extract_facts

    cfg = job.cfg
    records, report = read_records(cfg.data, "qa", RecordPolicy(empty_answer="skip"))
    if job.progress:
        print(report.summary())
    records = records[: cfg.limit] if cfg.limit is not None else records
    if hasattr(job.backend, "add_texts"):
        job.backend.add_texts(r.answer for r in records)  # offline revise draws replacement values from the data
    with job.bar(len(records), "extract") as bar:
        rows = extract_facts(job.backend, records, workers=cfg.workers, progress=bar.update)
    write_rows(job.out / "facts.jsonl", rows)
    bad = [{"id": r["id"], "stage": "extract", "question": r["question"], "reason": r["error"]}
           for r in rows if "error" in r]
    write_rows(job.out / "rejects_extract.jsonl", bad)
    job.stats["rows"], job.stats["facts"] = len(rows), sum(len(r.get("facts", [])) for r in rows)
    job.stats["rejected extract"] = len(bad)
    return rows


def _scored(job: _Job, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with perplexities: scored.jsonl reused while its stamp (facts, scorer, dtype) holds, else rebuilt."""
    from kt_jax.knowledge.augment import attach_perplexities

    cfg = job.cfg
    stamp = {"scorer": cfg.scorer, "model": cfg.model, "tokenizer": cfg.tokenizer, "max_len": cfg.max_len,
             "scores": cfg.scores and hashlib.sha256(Path(cfg.scores).read_bytes()).hexdigest(),
             "dtype": job.dtype if cfg.scorer == "model" else None,
             **({"add_bos": False} if cfg.scorer == "model" and not cfg.add_bos else {}),  # old stamps stay valid
             "facts": hashlib.sha256(json.dumps([(r["question"], r["input"], r.get("facts")) for r in rows],
                                                sort_keys=True).encode()).hexdigest()}
    info = {"mesh": dict(job.mesh.shape) if job.mesh is not None and cfg.scorer == "model" else None}
    writer = ResumableJsonl(job.out / "scored.jsonl", stamp=stamp, info=info, what="scored facts",
                            stamp_path=job.out / "scored.meta.json", restart=True)
    if writer.done(rows, ("id", "question", "input", "facts")) == len(rows):
        return writer.rows()  # the (expensive) perplexities are reused
    # One scoring call over every row, even after a torn write: rows scored in another batch could differ in the
    # last float bits, and a partial file only comes from a crash while writing, after the scoring finished.
    scored = attach_perplexities(rows, _scorer(job, rows))
    writer.reset()
    writer.append(scored)
    return scored


def _augment(job: _Job, rows: list[dict[str, Any]]) -> None:
    """ka.jsonl / ka.json and rejects_augment.jsonl: originals plus rewritten high-perplexity facts."""
    from kt_jax.knowledge.augment import build_ka

    scored = _scored(job, rows)
    with job.bar(len(scored), "rewrite") as bar:
        ka, rejects = build_ka(job.backend, scored, alpha=job.cfg.alpha, rounding=job.cfg.rounding,
                               workers=job.cfg.workers, progress=bar.update)
    ka_rows = [to_row(r) for r in ka]
    write_rows(job.out / "ka.jsonl", ka_rows)
    write_rows(job.out / "ka.json", ka_rows)
    write_rows(job.out / "rejects_augment.jsonl", rejects)
    job.stats["KA original"] = sum(r.provenance == "original" for r in ka)
    job.stats["KA rewritten"] = sum(r.provenance == "rewritten" for r in ka)
    job.stats["rejected augment"] = len(rejects)


def _compare(job: _Job, rows: list[dict[str, Any]]) -> None:
    """kc.jsonl / kc.json and rejects_compare.jsonl: (chosen, rejected) pairs per aspect."""
    from kt_jax.knowledge.compare import build_kc

    cfg = job.cfg
    with job.bar(len(rows) * (3 if cfg.combine == "llm" else 2), "compare") as bar:
        kc, rejects, kc_stats = build_kc(job.backend, rows, beta=cfg.beta, revise_ratio=cfg.revise_ratio,
                                         combine=cfg.combine, rounding=cfg.rounding, seed=cfg.seed,
                                         workers=cfg.workers,
                                         progress=bar.update)
    kc_rows = [to_row(r) for r in kc]
    write_rows(job.out / "kc.jsonl", kc_rows)
    write_rows(job.out / "kc.json", kc_rows)
    write_rows(job.out / "rejects_compare.jsonl", rejects)
    job.stats.update({f"KC {k}": v for k, v in kc_stats.items()})
    job.stats["rejected compare"] = len(rejects)


def build_knowledge(cfg: KnowledgeConfig, *, stage: str = "all", mesh: Mesh | None = None, dtype: str = "float32",
                    progress: bool = True) -> dict[str, Any]:
    """Run `stage` (extract | augment | compare | all) into `cfg.out`; the model scorer uses `mesh` and `dtype`."""
    from kt_jax.knowledge.registry import make_backend

    start = time.perf_counter()
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    cfg.validate()
    if not cfg.data or not cfg.out:
        raise ConfigError("data and out are required (in --config or as data=... out=...)")
    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: file does not exist")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "knowledge_config.yaml")
    options = {"cache": cfg.cache or str(out / "knowledge_cache.sqlite3"), **cfg.backend_options}
    job = _Job(cfg, out, make_backend(cfg.backend, **options), mesh, dtype, progress)
    facts_path = out / "facts.jsonl"
    if stage in ("extract", "all") or not facts_path.exists():
        rows = _extract(job)
    else:
        rows = read_rows(facts_path)
        job.stats["rows"], job.stats["facts"] = len(rows), sum(len(r.get("facts", [])) for r in rows)
        if hasattr(job.backend, "add_texts"):
            job.backend.add_texts(r["answer"] for r in rows)
    if stage in ("augment", "all"):
        _augment(job, rows)
    if stage in ("compare", "all"):
        _compare(job, rows)
    summary = {"stats": dict(job.stats), "backend": job.backend.summary(), "config": to_dict(cfg)}
    (out / f"summary_{stage}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "stage": stage, "out": str(out), "seconds": time.perf_counter() - start}
