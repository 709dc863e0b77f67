"""`kt-jax knowledge extract|augment|compare|all`: facts, KA and KC files from an alpaca QA file, in a run directory.

Outputs in `out`: `facts.jsonl` (per row: facts or the rejection reason), `scored.jsonl` (+ perplexities),
`ka.jsonl` / `ka.json` (alpaca rows with provenance), `kc.jsonl` / `kc.json` (LLaMA-Factory ranking rows
`output: [chosen, rejected]` with `aspect`), `rejects_<stage>.jsonl` (every item that failed, with its reason),
and `knowledge_config.yaml` (the resolved config). Every backend call is cached in `cache` (default
`<out>/knowledge_cache.sqlite3`) before it is used, so a killed run resumes where it stopped and a finished one
re-runs with zero backend calls. Secrets never enter the config: the Anthropic key is read from `api_key_env`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kt_jax.config import OVERRIDE_HELP, load_config, save_config, to_dict
from kt_jax.errors import ConfigError, DataError

STAGES = ("extract", "augment", "compare", "all")


@dataclasses.dataclass
class KnowledgeConfig:
    """Settings of `kt-jax knowledge` (YAML + dotted overrides)."""

    data: str = ""                       # alpaca QA file (.json / .jsonl / .parquet / saved HF dataset)
    out: str = ""                        # run directory
    backend: str = "offline"             # offline | anthropic
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # model, base_url, batch, prices...
    cache: str = ""                      # sqlite cache path ("" = <out>/knowledge_cache.sqlite3)
    limit: int | None = None             # only the first N rows
    workers: int = 4                     # concurrent backend calls
    alpha: float = 0.5                   # KA: share of facts (highest perplexity) rewritten
    scorer: str = "model"                # model (kt_jax.scoring fact perplexity) | file | lexical (model-free)
    scores: str = ""                     # scorer=file: a `kt-jax score` output of facts.jsonl (rows with ppl)
    model: str = ""                      # HF Llama directory for the model scorer
    tokenizer: str = ""                  # tokenizer path ("" = the model directory)
    max_len: int = 1024                  # scorer: max tokens of question + fact
    beta: float = 0.5                    # KC: share of facts deleted for the completeness pair
    revise_ratio: float = 1.0            # KC: share of facts replaced by their false revision
    combine: str = "concat"              # KC rejected text: concat (original method) | llm
    seed: int = 0                        # KC deletion / shuffle randomness

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        if self.backend not in ("offline", "anthropic"):
            raise ConfigError(f"backend: {self.backend!r} is not one of offline, anthropic")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="extract facts, build KA, build KC, or all three")
    parser.add_argument("--config", default=None, help="YAML file with KnowledgeConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"{OVERRIDE_HELP}; e.g. alpha=0.3")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from kt_jax.data.records import write_rows

    write_rows(path, rows)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    from kt_jax.data.records import read_rows

    return read_rows(path)


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)


def _scorer(cfg: KnowledgeConfig, rows: list[dict[str, Any]]) -> Any:
    from kt_jax.knowledge.augment import file_scorer, lexical_scorer, model_scorer

    if cfg.scorer == "lexical":
        return lexical_scorer([r["answer"] for r in rows])
    if cfg.scorer == "file":
        return file_scorer(cfg.scores)
    if not cfg.model:
        raise ConfigError("model: the model scorer needs a HF model directory (or set scorer=lexical)")
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.model.hf import load_pretrained

    return model_scorer(load_pretrained(cfg.model), load_tokenizer(cfg.tokenizer or cfg.model), max_len=cfg.max_len)


def _extract(cfg: KnowledgeConfig, out: Path, backend: Any, stats: Counter) -> list[dict[str, Any]]:
    from kt_jax.data.records import RecordPolicy, read_records
    from kt_jax.knowledge.augment import extract_facts

    records, report = read_records(cfg.data, "qa", RecordPolicy(empty_answer="skip"))
    print(report.summary())
    records = records[: cfg.limit] if cfg.limit is not None else records
    if hasattr(backend, "add_texts"):
        backend.add_texts(r.answer for r in records)  # offline revise draws replacement values from the data
    with _bar(len(records), "extract") as bar:
        rows = extract_facts(backend, records, workers=cfg.workers, progress=bar.update)
    _jsonl(out / "facts.jsonl", rows)
    bad = [{"id": r["id"], "stage": "extract", "question": r["question"], "reason": r["error"]}
           for r in rows if "error" in r]
    _jsonl(out / "rejects_extract.jsonl", bad)
    stats["rows"], stats["facts"] = len(rows), sum(len(r.get("facts", [])) for r in rows)
    stats["rejected extract"] = len(bad)
    return rows


def _augment(cfg: KnowledgeConfig, out: Path, backend: Any, rows: list[dict[str, Any]], stats: Counter) -> None:
    from kt_jax.data.records import to_row
    from kt_jax.knowledge.augment import build_ka, score_facts

    scorer_id = {"scorer": cfg.scorer, "model": cfg.model, "tokenizer": cfg.tokenizer, "max_len": cfg.max_len,
                 "scores": cfg.scores and hashlib.sha256(Path(cfg.scores).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps([scorer_id, [(r["question"], r["input"], r.get("facts")) for r in rows]],
                                       sort_keys=True).encode()).hexdigest()
    scored_path, meta_path = out / "scored.jsonl", out / "scored.meta.json"
    if scored_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("digest") == digest:
        scored = _read_rows(scored_path)  # same facts and scorer: reuse the (expensive) perplexities
    else:
        scored = score_facts(rows, _scorer(cfg, rows))
        _jsonl(scored_path, scored)
        meta_path.write_text(json.dumps({"digest": digest, **scorer_id}) + "\n")
    with _bar(len(scored), "rewrite") as bar:
        ka, rejects = build_ka(backend, scored, alpha=cfg.alpha, workers=cfg.workers, progress=bar.update)
    ka_rows = [to_row(r) for r in ka]
    _jsonl(out / "ka.jsonl", ka_rows)
    _jsonl(out / "ka.json", ka_rows)
    _jsonl(out / "rejects_augment.jsonl", rejects)
    stats["KA original"] = sum(r.provenance == "original" for r in ka)
    stats["KA rewritten"] = sum(r.provenance == "rewritten" for r in ka)
    stats["rejected augment"] = len(rejects)


def _compare(cfg: KnowledgeConfig, out: Path, backend: Any, rows: list[dict[str, Any]], stats: Counter) -> None:
    from kt_jax.data.records import to_row
    from kt_jax.knowledge.compare import build_kc

    with _bar(len(rows) * (3 if cfg.combine == "llm" else 2), "compare") as bar:
        kc, rejects, kc_stats = build_kc(backend, rows, beta=cfg.beta, revise_ratio=cfg.revise_ratio,
                                         combine=cfg.combine, seed=cfg.seed, workers=cfg.workers,
                                         progress=bar.update)
    kc_rows = [to_row(r) for r in kc]
    _jsonl(out / "kc.jsonl", kc_rows)
    _jsonl(out / "kc.json", kc_rows)
    _jsonl(out / "rejects_compare.jsonl", rejects)
    stats.update({f"KC {k}": v for k, v in kc_stats.items()})
    stats["rejected compare"] = len(rejects)


def run(args: argparse.Namespace) -> int:
    from kt_jax.knowledge import make_backend

    start = time.perf_counter()
    cfg = load_config(KnowledgeConfig, args.config, args.overrides)
    if not cfg.data or not cfg.out:
        raise ConfigError("data and out are required (in --config or as data=... out=...)")
    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: file does not exist")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "knowledge_config.yaml")
    options = {"cache": cfg.cache or str(out / "knowledge_cache.sqlite3"), **cfg.backend_options}
    backend = make_backend(cfg.backend, **options)
    stats: Counter = Counter()
    facts_path = out / "facts.jsonl"
    if args.stage in ("extract", "all") or not facts_path.exists():
        rows = _extract(cfg, out, backend, stats)
    else:
        rows = _read_rows(facts_path)
        stats["rows"], stats["facts"] = len(rows), sum(len(r.get("facts", [])) for r in rows)
        if hasattr(backend, "add_texts"):
            backend.add_texts(r["answer"] for r in rows)
    if args.stage in ("augment", "all"):
        _augment(cfg, out, backend, rows, stats)
    if args.stage in ("compare", "all"):
        _compare(cfg, out, backend, rows, stats)
    print(f"kt-jax knowledge {args.stage} -> {out} ({time.perf_counter() - start:.1f} s)")
    for key, value in stats.items():
        print(f"  {key}: {value}")
    print(f"  backend: {backend.summary()}")
    (out / f"summary_{args.stage}.json").write_text(json.dumps({"stats": dict(stats), "backend": backend.summary(),
                                                                "config": to_dict(cfg)}, indent=2) + "\n")
    return 0
