"""Hyperparameters chosen on the world's validation entities, with the same search budget for every system.

`search.candidates` lists K override sets, e.g. `{sft.optim.learning_rate: 1e-4, dpo.optim.learning_rate: 1e-5}`.
Every trained system runs each candidate's overrides of its own section (`sft.*` for SFT-type systems: sft, ka,
sft_steps; `dpo.*` for the preference systems) as stage `<system>@<i>`, answers the validation questions, and keeps
the candidate with the best validation `metric` (exact world checker; ties go to the earlier candidate). A system
that continues another (KnowTuning from KA-SFT) continues the chosen one. Only the chosen model of each system
answers the test questions, once; `search/<system>.json` and the report list every candidate's validation score.
Candidates that leave a system's section unchanged are trained once (no duplicate stages).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from kt_jax.errors import ConfigError

Pipeline = Any  # workflow.stages.Pipeline (not imported: it imports this module)

METRICS = ("completeness", "factuality", "recall_micro")  # names of the world checker's summary


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The validation search: K candidate override sets (none: no search) and the metric that picks one."""

    candidates: tuple[dict[str, Any], ...] = ()
    metric: str = "completeness"

    def validate(self) -> None:
        """Raise ConfigError naming the bad candidate or key."""
        if self.metric not in METRICS:
            raise ConfigError(f"search.metric: {self.metric!r} is not one of {list(METRICS)}")
        for i, cand in enumerate(self.candidates):
            if not isinstance(cand, dict) or not cand:
                raise ConfigError(f"search.candidates[{i}]: expected a non-empty mapping of dotted keys to values")
            for key in cand:
                if key.split(".", 1)[0] not in ("sft", "dpo") or "." not in key:
                    raise ConfigError(f"search.candidates[{i}]: {key!r} must be a dotted key under sft. or dpo. "
                                      "(e.g. sft.optim.learning_rate)")

    def section_configs(self, section: str, base: Any) -> list[Any]:
        """Each candidate's version of TuneConfig `base` for `section` ("sft" or "dpo"), in candidate order."""
        from kt_jax.config import from_dict, set_dotted, to_dict

        out = []
        for i, cand in enumerate(self.candidates):
            tree = to_dict(base)
            for key, value in _own(cand, section).items():
                set_dotted(tree, key.partition(".")[2], value)
            out.append(from_dict(type(base), tree, f"search.candidates[{i}]"))
        return out


def tune_chosen(pipe: Pipeline, name: str, *, start: str | None, train_file: str, kind: str, upstream: list[str],
                tune_cfg: Any = None) -> str:
    """`pipe.tune` for system `name`, or, with search candidates, every candidate and the validation-best one."""
    search: SearchConfig = pipe.cfg.search
    start = pipe.chosen.get(start, start) if start else start
    upstream = [pipe.chosen.get(u, u) for u in upstream]
    if not search.candidates:
        return pipe.tune(name, start=start, train_file=train_file, kind=kind, upstream=upstream, tune_cfg=tune_cfg)
    section = "dpo" if kind == "kc" else "sft"
    configs = search.section_configs(section, tune_cfg or getattr(pipe.cfg, section))
    first: dict[Any, int] = {}
    rows, exports = [], {}
    for i, cfg in enumerate(configs):
        j = first.setdefault(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), i)
        stage = f"{name}@{j}"
        if j == i:
            exports[i] = pipe.tune(stage, start=start, train_file=train_file, kind=kind, upstream=upstream,
                                   tune_cfg=cfg)
            score = validation_scores(pipe, stage, exports[i])
        else:
            exports[i], score = exports[j], rows[j]["validation"]
        rows.append({"candidate": i, "stage": stage, "overrides": _own(search.candidates[i], section),
                     "validation": score})
    best = max(range(len(rows)), key=lambda i: (rows[i]["validation"][search.metric], -i))
    pipe.chosen[name] = rows[best]["stage"]
    out = pipe.dir / "search" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"system": name, "metric": search.metric, "chosen": best, "candidates": rows},
                              indent=1) + "\n", encoding="utf-8")
    return exports[best]


def _own(candidate: dict[str, Any], section: str) -> dict[str, Any]:
    return {k: v for k, v in candidate.items() if k.startswith(section + ".")}


def validation_scores(pipe: Pipeline, stage: str, model: str) -> dict[str, float]:
    """`model` (trained by `stage`) answering the validation questions, scored by the world's exact checker."""
    from kt_jax.workflow.world_checks import world_rows

    path = pipe.generate(stage, model, upstream=[stage, pipe.source], data=pipe.valid_file, split="valid")
    summaries, _ = world_rows(pipe, {stage: path})
    return {m: float(summaries[stage][m]) for m in METRICS if m in summaries[stage]}


def search_table(run_dir: Any, searched: Iterable[str]) -> list[dict[str, Any]]:
    """The candidates and validation scores of the systems `searched` in this invocation (search/<system>.json), for
    the report; files left by earlier invocations with other systems or candidates are not read."""
    from pathlib import Path

    paths = [Path(run_dir, "search", f"{name}.json") for name in sorted(set(searched))]
    return [json.loads(p.read_text()) for p in paths if p.is_file()]
