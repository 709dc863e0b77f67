"""Pretrain a tiny Llama on a world's corpus (BPE trained on the corpus, packed next-token LM, AdamW) + recall probe.

`pretrain_world(preset, out_dir)` writes `out_dir/tokenizer/`, `out_dir/model/` (a HF directory transformers
loads, tokenizer included) and `out_dir/pretrain.json` (sizes, losses, wall time, probe scores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kt_jax.errors import ConfigError
from kt_jax.world.generator import World, WorldConfig, generate_world

log = logging.getLogger(__name__)
RESPONSE_MARK = "### Response:\n"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Tokenizer, model size and LM training of the world's base model."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    tie_word_embeddings: bool = True
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 10  # also the host-sync interval (jax 0.10.2 needs one at least every 16 steps)
    probe_max_new_tokens: int = 160

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"pretrain.hidden_size={self.hidden_size} is not a multiple of "
                              f"pretrain.num_heads={self.num_heads}")
        if not 1 <= self.log_every <= 16:
            raise ConfigError(f"pretrain.log_every={self.log_every}; must be in 1..16 (host sync interval)")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 16:
            raise ConfigError("pretrain.steps and pretrain.batch_size must be >= 1 and pretrain.seq_len >= 16")


@dataclasses.dataclass(frozen=True)
class WorldPreset:
    """A world plus its base model's pretraining (the `world:` and `pretrain:` sections of a config)."""

    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)


def load_preset(path: str | Path, overrides: Sequence[str] = ()) -> WorldPreset:
    """The `world:` and `pretrain:` sections of a YAML config (other sections are ignored) + dotted overrides."""
    import yaml

    from kt_jax.config import deep_merge, from_dict, parse_overrides

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = deep_merge({k: v for k, v in data.items() if k in ("world", "pretrain")}, parse_overrides(overrides))
    return from_dict(WorldPreset, data, str(path))


def encode_doc(tok: Any, doc: str) -> list[int]:
    """BOS + doc ids + EOS; an alpaca doc is tokenized as prompt + response continuation, as fine-tuning does."""
    from kt_jax.data.templates import encode_pair

    if RESPONSE_MARK in doc:
        cut = doc.index(RESPONSE_MARK) + len(RESPONSE_MARK)
        pair = encode_pair(tok, doc[:cut], doc[cut:], max_len=1 << 30)
        return pair.prompt_ids + pair.response_ids
    return ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(doc)) + [tok.eos_id]


def pack_rows(docs_ids: Sequence[list[int]], seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Shuffle docs and pack them next-fit into [N, seq_len] rows (`data.packing`); every next token is a target."""
    from kt_jax.data.packing import Bins, Segment, pack_arrays

    bins = Bins(seq_len, last_only=True)
    for i in rng.permutation(len(docs_ids)):
        ids = docs_ids[i][:seq_len]
        bins.add(Segment.lm(ids), len(ids))
    return pack_arrays(bins.bins, seq_len).batch.as_dict()


def lm_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over `loss_mask` (the shared chunked log-prob code of scoring/training)."""
    from kt_jax.data.batch import SeqBatch
    from kt_jax.ops.logprobs import masked_sum
    from kt_jax.train.steps import batch_logprobs

    total_B, count_B = masked_sum(batch_logprobs(model, SeqBatch(**batch)), batch["loss_mask"])
    return -total_B.sum() / jnp.maximum(count_B.sum(), 1.0)


def build_model(cfg: PretrainConfig, vocab_size: int) -> Any:
    """A randomly initialised Llama of the configured size."""
    from kt_jax.model.llama import Llama, LlamaConfig

    lcfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                       tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=2048)
    return Llama(lcfg, nnx.Rngs(params=cfg.seed))


def train_lm(model: Any, rows_fn: Callable[[int], dict[str, np.ndarray]], cfg: PretrainConfig,
             progress: bool = False) -> list[float]:
    """Train `model` in place with AdamW (warmup + cosine); returns the mean loss of every `log_every` steps.

    `rows_fn(epoch)` gives that epoch's packed rows (a dict of [N, T] arrays); batches are taken in row order.
    """
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps - 1) or 1, cfg.steps,
                                               cfg.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=cfg.weight_decay))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p, rest), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses: list[float] = []
    epoch, pool, cursor = 0, rows_fn(0), 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain", unit="step")
    pending = []
    for i in range(cfg.steps):
        if cursor + cfg.batch_size > len(pool["input_ids"]):
            epoch += 1
            pool, cursor = rows_fn(epoch), 0
        idx = np.arange(cursor, cursor + cfg.batch_size) % len(pool["input_ids"])
        cursor += cfg.batch_size
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in pool.items()})
        pending.append(loss)
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            value = float(np.mean([float(x) for x in pending]))  # host sync
            losses.append(value)
            pending = []
            if bar is not None:
                bar.update(i + 1 - bar.n)
                bar.set_postfix(loss=f"{value:.3f}", epoch=epoch)
    if bar is not None:
        bar.close()
    nnx.update(model, params)
    return losses


def recall_probe(model: Any, tok: Any, world: World, entity_ids: Sequence[str], max_new_tokens: int,
                 batch_size: int = 16) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to "Tell me about X." (alpaca prompt) for `entity_ids`, scored by the exact checker."""
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.generate import SamplingConfig, generate
    from kt_jax.world.checker import Checker, summarize
    from kt_jax.world.schema import OVERVIEW_QUESTION

    checker = Checker(world)
    questions = [OVERVIEW_QUESTION.format(e=world.entities[e].display) for e in entity_ids]
    answers = generate(model, tok, [alpaca_prompt(q) for q in questions], SamplingConfig.greedy(max_new_tokens),
                       batch_size=batch_size)
    reports = [checker.check(a, e) for a, e in zip(answers, entity_ids, strict=True)]
    rows = [{"question": q, "answer": a, "completeness": r.completeness, "factuality": r.factuality,
             "logicality": r.logicality} for q, a, r in zip(questions, answers, reports, strict=True)]
    return summarize(reports), rows


def pretrain_world(preset: WorldPreset, out_dir: str | Path, *, world: World | None = None, probe: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """Train tokenizer + base model on the world's corpus; save both as a HF directory; probe recall."""
    from kt_jax.data.tokenizer import train_bpe_tokenizer
    from kt_jax.model.hf import save_pretrained
    from kt_jax.world.render import corpus

    cfg = preset.pretrain
    out = Path(out_dir)
    world = world if world is not None else generate_world(preset.world)
    t0 = time.perf_counter()
    docs = corpus(world)
    tok = train_bpe_tokenizer(docs, cfg.vocab_size, out / "tokenizer")
    docs_ids = [encode_doc(tok, d) for d in docs]
    longest = max(len(d) for d in docs_ids)
    if longest > cfg.seq_len:
        raise ConfigError(f"pretrain.seq_len={cfg.seq_len} is shorter than the longest corpus document ({longest} "
                          "tokens); raise it")
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, tok.vocab_size)
    t1 = time.perf_counter()
    losses = train_lm(model, lambda epoch: pack_rows(docs_ids, cfg.seq_len, rng), cfg, progress=progress)
    t2 = time.perf_counter()
    save_pretrained(model, out / "model", copy_tokenizer_from=out / "tokenizer")
    tokens = sum(len(d) for d in docs_ids)
    stats: dict[str, Any] = {
        "num_params": model.config.num_params(), "vocab_size": tok.vocab_size, "corpus_docs": len(docs),
        "corpus_tokens": tokens, "epochs": cfg.steps * cfg.batch_size * cfg.seq_len / max(tokens, 1),
        "losses": losses, "first_loss": losses[0], "final_loss": losses[-1],
        "seconds_setup": t1 - t0, "seconds_train": t2 - t1, "steps": cfg.steps,
    }
    if probe:
        t3 = time.perf_counter()
        summary, rows = recall_probe(model, tok, world, world.test_ids, cfg.probe_max_new_tokens)
        stats.update(probe=summary, seconds_probe=time.perf_counter() - t3)
        (out / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kt_jax.world.pretrain CONFIG OUT_DIR [key=value ...]`: pretrain and print the probe."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    preset = load_preset(args.config, args.overrides)
    stats = pretrain_world(preset, args.out_dir, progress=True)
    print(json.dumps({k: v for k, v in stats.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
