"""Answer a QA test set with a checkpoint: predictions.jsonl (resumable) plus generate_config.json, in a directory.

Each row of predictions.jsonl: `id` (the test row's index), `question`, `input`, `reference` (the test answer),
`prediction`, `new_tokens` and `finished` (ended with EOS rather than at the new-token limit).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from kt_jax.data.resumable import ResumableJsonl
from kt_jax.errors import ConfigError
from kt_jax.inference.sampling import SamplingConfig

PREDICTIONS = "predictions.jsonl"
CONFIG = "generate_config.json"
PRESETS = ("knowtuning", "greedy")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of a generation pass over a QA test set (`kt-jax generate`)."""

    model: str = ""                      # HF Llama directory (merged/exported checkpoint)
    data: str = ""                       # QA test set: alpaca JSON/JSONL (instruction, input, output)
    out: str = ""                        # directory for predictions.jsonl and generate_config.json
    tokenizer: str = ""                  # tokenizer path ("" = the model directory)
    preset: str = "knowtuning"           # knowtuning (T=0.95, top-p 0.7, top-k 50, 512 new tokens) | greedy
    max_new_tokens: int | None = None    # override the preset's new-token limit
    temperature: float | None = None     # override the preset's temperature
    top_k: int | None = None             # override the preset's top-k (0 = off)
    top_p: float | None = None           # override the preset's top-p (1 = off)
    seed: int = 0                        # sampling seed (row i uses seed and i)
    batch_size: int = 8                  # prompts per jitted generation call
    max_prompt_len: int = 1024           # prompts keep their last N tokens
    template: str = "llamafactory-0.5.3" # alpaca template style
    add_bos: bool = True                 # BOS before the prompt (as the training data's add_bos)
    limit: int | None = None             # only the first N test rows (None or 0: all)
    chunk: int = 64                      # prompts written per chunk (the resume granularity)
    dtype: str = "float32"               # compute dtype: float32 | bfloat16

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("batch_size", "max_prompt_len", "chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        self.sampling()

    def sampling(self) -> SamplingConfig:
        """The preset with this config's overrides applied."""
        changes = {k: v for k, v in (("max_new_tokens", self.max_new_tokens), ("temperature", self.temperature),
                                      ("top_k", self.top_k), ("top_p", self.top_p)) if v is not None}
        return dataclasses.replace(SamplingConfig.preset(self.preset), **changes)


def generate_file(cfg: GenerateConfig, *, mesh: Mesh | None, progress: bool = True) -> dict[str, Any]:
    """Answer the test rows of `cfg.data` not yet in `<out>/predictions.jsonl` on `mesh`; returns a summary."""
    from tqdm import tqdm

    from kt_jax.data.records import read_records
    from kt_jax.data.templates import alpaca_prompt, encode_prompt
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.sampling import generate_ids
    from kt_jax.model.hf import load_pretrained

    cfg.validate()
    if not (cfg.model and cfg.data and cfg.out):
        raise ConfigError("model, data and out are required (HF model directory, QA test set, output directory)")
    sampling = cfg.sampling()
    out = Path(cfg.out)
    tokenizer = cfg.tokenizer or cfg.model
    stamp = {"model": cfg.model, "tokenizer": tokenizer, "data": cfg.data, "sampling": dataclasses.asdict(sampling),
             "seed": cfg.seed, "batch_size": cfg.batch_size, "max_prompt_len": cfg.max_prompt_len,
             "template": cfg.template, "limit": cfg.limit, "dtype": cfg.dtype,
             **({} if cfg.add_bos else {"add_bos": False})}  # predictions made with BOS keep their stamp
    info = {"chunk": cfg.chunk, "mesh": dict(mesh.shape) if mesh is not None else None}
    writer = ResumableJsonl(out / PREDICTIONS, stamp=stamp, info=info, what="predictions", stamp_path=out / CONFIG,
                            ensure_ascii=True)
    records, report = read_records(cfg.data, "qa")
    records = records[: cfg.limit] if cfg.limit else records
    inputs = [{"id": i, "question": r.question, "input": r.input} for i, r in enumerate(records)]
    done = writer.done(inputs, ("id", "question", "input"))
    todo = list(range(done, len(records)))
    summary: dict[str, Any] = {"output": str(writer.path), "predictions": len(records), "already": done,
                               "new": len(todo), "new_tokens": 0, "seconds": 0.0}
    if progress:
        print(f"{report.summary()}; {done} already answered, {len(todo)} to go")
    if not todo:
        return summary
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    model = load_pretrained(cfg.model, mesh=mesh, dtype=cfg.dtype)
    with tqdm(total=len(todo), desc="generate", unit="q", disable=not progress) as bar:
        for c in range(0, len(todo), cfg.chunk):
            rows = todo[c : c + cfg.chunk]
            prompts = [alpaca_prompt(records[i].question, records[i].input, cfg.template) for i in rows]
            prompt_ids = [encode_prompt(tok, p, add_bos=cfg.add_bos) for p in prompts]
            ids = generate_ids(model, prompt_ids, sampling, eos_ids=(tok.eos_id,), pad_id=tok.pad_id, mesh=mesh,
                               seed=cfg.seed, batch_size=cfg.batch_size, max_prompt_len=cfg.max_prompt_len)
            written = []
            for i, toks in zip(rows, ids, strict=True):
                finished = bool(toks) and toks[-1] == tok.eos_id
                text = tok.decode([t for t in toks if t != tok.eos_id])
                summary["new_tokens"] += len(toks)
                written.append({"id": i, "question": records[i].question, "input": records[i].input,
                                "reference": records[i].answer, "prediction": text, "new_tokens": len(toks),
                                "finished": finished})
            writer.append(written)
            bar.update(len(rows))
    summary["seconds"] = time.perf_counter() - start
    return summary
