"""What a world run adds to the report: per-question exact metrics, paired bootstrap differences against SFT, the
instrument's validity checks (stored, learned, power, determinism) and a forest plot."""

from __future__ import annotations

import json
from typing import Any

Pipeline = Any  # workflow.stages.Pipeline (not imported: it imports this module)

DIFF_METRICS = ("completeness", "factuality", "logicality", "recall", "wrong_per_answer")
DETERMINISM_ROWS = 32  # test questions the SFT model answers a second time for the determinism check


def world_rows(pipe: Pipeline, predictions: dict[str, str]
               ) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """Each system's checker summary and per-question rows (the same question order for every system)."""
    from kt_jax.eval.job import load_predictions
    from kt_jax.world.checker import evaluate_answers, per_question
    from kt_jax.world.generator import World
    from kt_jax.world.render import load_questions

    world = World.load(pipe.dir / "world" / "world.json")
    questions = load_questions(pipe.dir / "world" / "questions.jsonl")
    summaries, rows = {}, {}
    for name, path in predictions.items():
        preds = load_predictions(path)
        summaries[name], reports = evaluate_answers(world, [questions[r["question"]] for r in preds],
                                                    [r["prediction"] for r in preds])
        rows[name] = [{**row, "kind": questions[r["question"]].kind}
                      for row, r in zip(per_question(reports), preds, strict=True)]
    return summaries, rows


def by_kind(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {question kind: means}}: where a system gains or loses (overview answers vs narrow ones)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, system_rows in rows.items():
        for kind in sorted({r["kind"] for r in system_rows}):
            part = [r for r in system_rows if r["kind"] == kind]
            mean = lambda key, part=part: sum(r[key] for r in part) / len(part)
            out.setdefault(name, {})[kind] = {
                "questions": len(part), "completeness": mean("completeness"), "stated_per_answer": mean("stated"),
                "wrong_per_answer": mean("wrong"), "off_target_per_answer": mean("off_target")}
    return out


def differences(rows: dict[str, list[dict[str, Any]]], baseline: str = "sft") -> dict[str, dict[str, Any]]:
    """{system: {metric: {mean, ci_low, ci_high}}}: system minus baseline, paired bootstrap over test questions."""
    from kt_jax.eval.statistics import WORLD_METRICS, world_differences

    metrics = [m for m in DIFF_METRICS if m in WORLD_METRICS]
    return {name: {m: dict(v) for m, v in world_differences(r, rows[baseline], metrics=metrics).items()}
            for name, r in rows.items() if name != baseline}


def base_answers(pipe: Pipeline) -> str:
    """predictions/base: the base model answering the test questions in the QA template (before fine-tuning)."""
    return pipe.generate("base", pipe.base_model, upstream=[pipe.source])


def cloze(pipe: Pipeline) -> dict[str, Any]:
    """The stored check's probe: the base model completes test-entity facts in corpus wording (greedy)."""
    out = pipe.dir / "eval" / "cloze.json"

    def run() -> dict[str, Any]:
        from kt_jax.data.tokenizer import load_tokenizer
        from kt_jax.model.hf import load_pretrained
        from kt_jax.world.generator import World
        from kt_jax.world.validity import cloze_probe

        world = World.load(pipe.dir / "world" / "world.json")
        model = load_pretrained(pipe.base_model, mesh=pipe.mesh_())
        recall, rows = cloze_probe(model, load_tokenizer(pipe.tokenizer), world, world.test_ids, mesh=pipe.mesh_())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"recall": recall, "items": rows}, indent=1) + "\n")
        return {"recall": recall, "items": len(rows)}

    pipe.stages.run("cloze", run, settings={"probe": "cloze-v1"}, upstream=[pipe.source], outputs=[out])
    return json.loads(out.read_text())


def regenerate(pipe: Pipeline, model: str) -> list[str]:
    """The SFT model's answers to the first test questions, generated a second time (determinism)."""
    import dataclasses

    from kt_jax.data.records import read_rows
    from kt_jax.inference.generate_file import generate_file

    out = pipe.dir / "eval" / "determinism"
    cfg = dataclasses.replace(pipe.cfg.generate, model=model, data=pipe.test_file, out=str(out),
                              tokenizer=pipe.tokenizer, template=pipe.cfg.sft.data.template, limit=DETERMINISM_ROWS)
    pipe.stages.run("determinism", lambda: {"rows": generate_file(cfg, mesh=pipe.mesh_()).get("rows")},
                    settings={"rows": DETERMINISM_ROWS}, upstream=["generate_sft"],
                    outputs=[out / "predictions.jsonl"], scratch=[out])
    return [r["prediction"] for r in read_rows(out / "predictions.jsonl")]


def entity_half_width(system_rows: list[dict[str, Any]], sft_rows: list[dict[str, Any]]) -> float:
    """Half-width of the completeness-difference CI when whole entities are resampled (questions about one entity
    are correlated, so this is the honest width; the power check uses the per-question one the issue defines)."""
    from kt_jax.eval.statistics import paired_bootstrap

    def column(rows: list[dict[str, Any]]) -> list[float]:
        return [float("nan") if r["completeness"] is None else r["completeness"] for r in rows]

    ci = paired_bootstrap(column(system_rows), column(sft_rows), clusters=[r["entity_id"] for r in sft_rows])
    return (ci["ci_high"] - ci["ci_low"]) / 2


def validity(rows: dict[str, list[dict[str, Any]]], diffs: dict[str, dict[str, Any]], cloze_recall: float,
             sft_answers: list[str], sft_again: list[str]) -> dict[str, dict[str, Any]]:
    """{check: {value, threshold, pass, ...}} for the world instrument, whatever the ranking of the systems."""
    from kt_jax.world.validity import check_determinism, check_learned, check_power, check_stored

    def mean(name: str) -> float:
        values = [r["completeness"] for r in rows[name] if r["completeness"] is not None]
        return sum(values) / len(values) if values else float("nan")

    out = {"stored": check_stored(cloze_recall), "learned": check_learned(mean("sft"), mean("base"))}
    compared = "knowtuning" if "knowtuning" in diffs else next(iter(diffs), None)
    if compared is not None:
        out["power"] = {**check_power(len(rows["sft"]), diffs[compared]["completeness"]), "system": compared,
                        "entities": len({r["entity_id"] for r in rows["sft"]}),
                        "entity_resampled_half_width": entity_half_width(rows[compared], rows["sft"])}
    out["determinism"] = {**check_determinism(sft_answers[: len(sft_again)], sft_again),
                          "what": f"the SFT model's greedy answers to the first {len(sft_again)} test questions, "
                                  "generated twice in this run"}
    return out


def world_report(pipe: Pipeline, predictions: dict[str, str], base_predictions: str) -> dict[str, Any]:
    """eval/world_metrics.json: per-system exact metrics, differences against SFT (with a forest plot) and validity."""
    from kt_jax.data.records import read_rows
    from kt_jax.eval.statistics import forest_plot

    out = pipe.dir / "eval" / "world_metrics.json"
    recall = cloze(pipe)["recall"]
    again = regenerate(pipe, str(pipe.dir / "train" / pipe.chosen.get("sft", "sft") / "export"))

    def run() -> dict[str, Any]:
        summaries, rows = world_rows(pipe, {**predictions, "base": base_predictions})
        diffs = differences({k: v for k, v in rows.items() if k != "base"})
        sft_answers = [r["prediction"] for r in read_rows(predictions["sft"])]
        report = {"metrics": summaries, "differences": diffs,
                  "validity": validity(rows, diffs, recall, sft_answers, again), "questions": len(rows["sft"]),
                  "by_kind": by_kind(rows), "rows": rows}
        if diffs:
            forest_plot(diffs, pipe.dir / "eval" / "differences.png")
        out.write_text(json.dumps(report, indent=2) + "\n")
        return {k: report[k] for k in ("validity", "questions")}

    pipe.stages.run("world_metrics", run, settings={"systems": sorted(predictions), "metrics": DIFF_METRICS},
                    upstream=["world", "cloze", "determinism", "generate_base",
                              *(f"generate_{name}" for name in predictions)], outputs=[out])
    return json.loads(out.read_text())
