"""Pretrain a tiny Llama on a world's corpus (BPE trained on the corpus, packed next-token LM, AdamW) + recall probe.

`pretrain_world(preset, out_dir)` writes `out_dir/tokenizer/`, `out_dir/model/` (a HF directory transformers
loads, tokenizer included) and `out_dir/pretrain.json` (sizes, losses, wall time, probe scores). Training goes
through `train/` (the SFT loss over every next token, `train.optimizer`, `train.loop`); its checkpoints and
metrics.jsonl live in `out_dir/train-<hash>/`, so an interrupted pretraining resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kt_jax.data.batch import SeqBatch
from kt_jax.errors import ConfigError, KtJaxError
from kt_jax.train.config import OptimConfig, TrainConfig
from kt_jax.world.generator import World, WorldConfig, generate_world

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


def encode_doc(tok: Any, doc: str) -> list[int]:
    """BOS + doc ids + EOS; an alpaca doc is tokenized as prompt + response continuation, as fine-tuning does."""
    from kt_jax.data.templates import encode_pair

    if RESPONSE_MARK in doc:
        cut = doc.index(RESPONSE_MARK) + len(RESPONSE_MARK)
        pair = encode_pair(tok, doc[:cut], doc[cut:], max_len=1 << 30)
        return pair.prompt_ids + pair.response_ids
    return ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(doc)) + [tok.eos_id]


def pack_rows(docs_ids: Sequence[list[int]], seq_len: int, rng: np.random.Generator) -> SeqBatch:
    """Shuffle docs and pack them first-fit into [N, seq_len] rows (`data.packing`); every next token is a target.

    First-fit fills rows of a world corpus to ~88% at seq_len 128 where next-fit reaches ~81% (fewer steps per epoch).
    """
    from kt_jax.data.packing import Bins, Segment, pack_arrays

    bins = Bins(seq_len)
    for i in rng.permutation(len(docs_ids)):
        ids = docs_ids[i][:seq_len]
        bins.add(Segment.lm(ids), len(ids))
    return pack_arrays(bins.bins, seq_len).batch


def build_model(cfg: PretrainConfig, vocab_size: int, mesh: Mesh | None = None) -> Any:
    """A randomly initialised Llama of the configured size (parameters laid out on `mesh` by the rules)."""
    from kt_jax.model.llama import Llama, LlamaConfig, ShardContext
    from kt_jax.sharding import state_shardings

    lcfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                       tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=2048)
    model = Llama(lcfg, nnx.Rngs(params=cfg.seed), shard_ctx=None if mesh is None else ShardContext(mesh))
    if mesh is not None:
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def optim_config(cfg: PretrainConfig) -> OptimConfig:
    """Pretraining's AdamW: linear warmup (at least one step) then cosine to lr/10, b2=0.98, global-norm clip 1."""
    return OptimConfig(learning_rate=cfg.lr, warmup_steps=max(cfg.warmup_steps, 1), end_lr_ratio=0.1,
                       weight_decay=cfg.weight_decay, b2=0.98, max_grad_norm=1.0)


def train_config(cfg: PretrainConfig, progress: bool = False) -> TrainConfig:
    """The loop settings of pretraining: `steps` updates, every step's metrics logged, `log_every` steps in flight."""
    return TrainConfig(num_steps=cfg.steps, log_every=1, max_in_flight=cfg.log_every, compute_dtype="float32",
                       seed=cfg.seed, tensorboard=False, progress=progress)


class LMBatches:
    """Packed LM batches in a fixed order: epoch e packs the e-th shuffle of the docs; rows are taken in order.

    Yields this process's share of each global batch (`data.batch.SeqBatch`); `get_state`/`set_state` hold the
    step and replay the order, so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, docs_ids: Sequence[list[int]], cfg: PretrainConfig, process_index: int = 0,
                 process_count: int = 1) -> None:
        if cfg.batch_size % process_count:
            raise ConfigError(f"pretrain.batch_size={cfg.batch_size} does not split over {process_count} processes")
        self._docs, self._cfg = docs_ids, cfg
        per = cfg.batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self.set_state({"step": 0})

    def get_state(self) -> dict[str, int]:
        """The number of batches taken."""
        return {"step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        """Rewind to the start and skip `state["step"]` batches."""
        self._rng = np.random.default_rng(self._cfg.seed)
        self._pool, self._cursor, self._step = pack_rows(self._docs, self._cfg.seq_len, self._rng), 0, 0
        for _ in range(int(state["step"])):
            self._advance()

    def _advance(self) -> np.ndarray:
        """Row indices of the next global batch (a new epoch is packed when the current one runs out)."""
        size = self._cfg.batch_size
        if self._cursor + size > len(self._pool.input_ids):
            self._pool, self._cursor = pack_rows(self._docs, self._cfg.seq_len, self._rng), 0
        idx = np.arange(self._cursor, self._cursor + size) % len(self._pool.input_ids)
        self._cursor += size
        self._step += 1
        return idx

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> SeqBatch:
        idx = self._advance()[self._rows]
        return jax.tree.map(lambda x: x[idx], self._pool)


def train_lm(model: Any, data: LMBatches, cfg: PretrainConfig, run_dir: str | Path, *, mesh: Mesh | None = None,
             progress: bool = False) -> tuple[Any, list[float]]:
    """Train `model` on `data` with `train.loop` (resuming from `run_dir`); (trained model, every step's loss)."""
    from kt_jax.train.loop import train
    from kt_jax.train.optimizer import lr_schedule, make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_sft_loss, make_train_step

    optim = optim_config(cfg)
    tx = make_optimizer(optim, cfg.steps)
    ts = create_state(model, tx, mesh)
    step = make_train_step(ts, tx, make_sft_loss())  # the token-mean CE over loss_mask = every next token
    train(ts, step, data, cfg=train_config(cfg, progress), total_steps=cfg.steps, run_dir=run_dir, mesh=mesh,
          lr_fn=lr_schedule(optim, cfg.steps))
    return ts.model(), step_losses(run_dir, cfg.steps)


def step_losses(run_dir: str | Path, steps: int) -> list[float]:
    """The training loss of steps 1..`steps` from `run_dir/metrics.jsonl`."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}
    missing = [s for s in range(1, steps + 1) if by_step.get(s) is None]
    if missing:
        raise KtJaxError(f"{path}: no finite training loss for steps {missing[:5]}")
    return [float(by_step[s]) for s in range(1, steps + 1)]


def window_means(values: Sequence[float], every: int) -> list[float]:
    """Means of consecutive windows of `every` values (the last may be shorter)."""
    return [float(np.mean(values[i:i + every])) for i in range(0, len(values), every)]


def recall_probe(model: Any, tok: Any, world: World, entity_ids: Sequence[str], max_new_tokens: int,
                 batch_size: int = 16) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to "Tell me about X." (alpaca prompt) for `entity_ids`, scored by the exact checker."""
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.inference.sampling import SamplingConfig, generate
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
                   progress: bool = False, mesh: Mesh | None = None) -> dict[str, Any]:
    """Train tokenizer + base model on the world's corpus (on `mesh`); save both as a HF directory; probe recall."""
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
    model = build_model(cfg, tok.vocab_size, mesh)
    data = LMBatches(docs_ids, cfg, jax.process_index(), jax.process_count())
    t1 = time.perf_counter()
    model, step_loss = train_lm(model, data, cfg, _run_dir(out, cfg, docs_ids), mesh=mesh, progress=progress)
    losses = window_means(step_loss, cfg.log_every)
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


def _run_dir(out: Path, cfg: PretrainConfig, docs_ids: Sequence[list[int]]) -> Path:
    """`out/train-<hash of the training settings and the encoded corpus>`: checkpoints resume only the same run.

    The probe length and the loss-logging window do not change the trained weights, so they are left out.
    """
    from kt_jax.config import config_hash, to_dict

    trained = to_dict(dataclasses.replace(cfg, probe_max_new_tokens=0, log_every=1))
    corpus_digest = hashlib.sha256(json.dumps(docs_ids, separators=(",", ":")).encode()).hexdigest()
    run_dir = out / f"train-{config_hash({'pretrain': trained, 'corpus': corpus_digest})}"
    if jax.process_index() == 0:
        for stale in out.glob("train-*"):
            if stale != run_dir:
                shutil.rmtree(stale, ignore_errors=True)
    return run_dir
