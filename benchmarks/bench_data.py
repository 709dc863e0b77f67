"""Data pipeline throughput vs what a ~50M Llama train step consumes (CPU).

Run: `.venv/bin/python benchmarks/bench_data.py [--rows 4000] [--max-len 1024] [--steps 3]`

Data: ../shared/data/knowtuning/dolly_train.json when present, else synthetic rows with Dolly-like lengths.
Tokenizer: a 32k byte-level BPE trained on the data (Llama-2-sized vocabulary).
Rows of the table:
- kt-jax SFT pipeline (packed / padded / packed + global jax.Array on the local devices), examples/s;
- peer: transformers' fast tokenizer (PreTrainedTokenizerFast on the same tokenizer.json) encoding the same
  prompt and response texts, examples/s (tokenization only: the floor of any HF-style pipeline);
- the train step: jax.grad of a masked token-mean CE through a ~50M Llama (kt_jax.model) on one packed row,
  converted to examples/s with the measured examples per packed row;
- first, this machine's float32 matmul rates with jax and with torch (`common.matmul_peak`); the (jax) train
  step's achieved FLOP/s against the jax rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowtuning" / "dolly_train.json"


def load_records(rows: int) -> tuple[list, str]:
    """Dolly train rows (real file if present) or synthetic rows with similar character lengths."""
    from kt_jax.data.records import QARecord, read_records

    if REAL.is_file():
        recs, _ = read_records(REAL)
        return recs[:rows], f"dolly_train.json ({min(rows, len(recs))} rows)"
    rng = np.random.default_rng(0)
    vocab = "the of and a to in is was for on that with as by at from it an be this which or are his her their"
    words = [*vocab.split(" "), "capital", "city", "river", "king", "queen", "water", "answer", "question"]

    def text(mean_chars: float) -> str:
        n = max(1, int(rng.lognormal(np.log(mean_chars / 5.5), 0.8)))
        return " ".join(rng.choice(words, n)).capitalize() + "."

    return [QARecord(text(70) + "?", text(380)) for _ in range(rows)], f"synthetic ({rows} rows, Dolly-like lengths)"


def time_pipeline(make, max_batches: int | None = None, put=None) -> tuple[float, int, int]:
    """(seconds, examples, batches) for one pass of a fresh iterator (each batch passed to `put` if given)."""
    it = iter(make())
    t0 = time.perf_counter()
    batches = 0
    for batch in it:
        if put is not None:
            put(batch)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    return time.perf_counter() - t0, it.counts["examples"], batches


def time_train_step(vocab: int, max_len: int, batch, steps: int) -> tuple[float, int, float]:
    """(seconds per fwd+bwd, parameter count, FLOPs per step) of a ~50M Llama on `batch`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kt_jax.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8,
                      num_kv_heads=8, max_position_embeddings=max_len)
    model = Llama(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def loss_fn(p, b):
        m = nnx.merge(graphdef, p)
        logits = m(b["input_ids"], positions_BxT=b["positions"], segment_ids_BxT=b["segment_ids"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        return -(lp * b["loss_mask"]).sum() / jnp.maximum(b["loss_mask"].sum(), 1.0)

    step = jax.jit(jax.value_and_grad(loss_fn))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    jax.block_until_ready(step(params, b))  # compile
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(params, b)
        float(loss)  # wait every step (CPU-mesh hang rule; also honest timing)
    seconds = (time.perf_counter() - t0) / steps
    tokens = int(np.prod(batch["input_ids"].shape))
    d, layers, t = cfg.hidden_size, cfg.num_layers, batch["input_ids"].shape[1]
    flops = 6 * n_params * tokens + 12 * layers * d * t * tokens  # dense + attention, fwd+bwd
    return seconds, n_params, flops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from common import matmul_peak

    peak = matmul_peak()
    print(peak.line(), flush=True)

    from kt_jax.data.loader import DataConfig, length_report, make_dataset
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.data.tokenizer import train_bpe_tokenizer
    from kt_jax.sharding import make_mesh, to_device

    recs, source = load_records(args.rows)
    tmp = tempfile.mkdtemp()
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer((r.question + "\n" + r.answer for r in recs), 32000, tmp)
    train_s = time.perf_counter() - t0
    cfg = DataConfig(max_len=args.max_len, batch_size=args.batch_size, num_epochs=1, seed=0)
    report = length_report(recs, tok, cfg)
    rows_out = []

    def add(name: str, examples: int, seconds: float, note: str = "") -> None:
        rows_out.append((name, examples / seconds, note))

    s, n, nb = time_pipeline(lambda: make_dataset(recs, tok, cfg))
    add("pipeline: SFT packed (host numpy)", n, s, f"{nb} batches [{args.batch_size},{args.max_len}]")
    per_row = n / (nb * args.batch_size)
    fill = report["tokens"] / (nb * args.batch_size * args.max_len)
    s, n, nb = time_pipeline(lambda: make_dataset(recs, tok, DataConfig(**{**cfg.__dict__, "pack": False})))
    add("pipeline: SFT padded, bucketed (host numpy)", n, s, f"{nb} batches")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    s, n, nb = time_pipeline(lambda: make_dataset(recs, tok, cfg), put=lambda b: to_device(b, mesh))
    add("pipeline: SFT packed + global jax.Array", n, s, "1 CPU device")

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
    prompts = [alpaca_prompt(r.question, r.input) for r in recs]
    t0 = time.perf_counter()
    for p, r in zip(prompts, recs, strict=True):
        hf.encode(p, add_special_tokens=False)
        hf.encode(r.answer, add_special_tokens=False)
    add("peer: transformers fast tokenizer, encode only", len(recs), time.perf_counter() - t0, "no masks/packing")

    first = next(iter(make_dataset(recs, tok, DataConfig(**{**cfg.__dict__, "batch_size": 1})))).as_dict()
    step_s, n_params, flops = time_train_step(tok.vocab_size, args.max_len, first, args.steps)
    add(f"train step: {n_params / 1e6:.0f}M Llama fwd+bwd, 1 packed row", per_row, step_s,
        f"{step_s:.2f} s/step, {per_row:.2f} examples/row")

    print(f"data: {source}; tokenizer: 32k byte-level BPE (trained in {train_s:.1f} s); max_len {args.max_len}")
    print(f"lengths: mean {report['mean_len']:.0f} tokens, max {report['max_len']}, truncated {report['truncated']}, "
          f"skipped {report['skipped_overlength']}; packed {per_row:.2f} examples/row, {100 * fill:.0f}% of slots used")
    print(f"{'what':<52} {'examples/s':>12}  note")
    for name, rate, note in rows_out:
        print(f"{name:<52} {rate:>12.1f}  {note}")
    print(f"train step achieves {flops / step_s / 1e9:.1f} GFLOP/s ({100 * flops / step_s / peak.jax:.0f}% of the jax "
          "matmul rate above)")
    slowest_pipeline = min(rate for name, rate, _ in rows_out if name.startswith("pipeline"))
    print(f"pipeline / train-step consumption: {slowest_pipeline / rows_out[-1][1]:.0f}x "
          "(per process; > 1 means the pipeline is not the bottleneck)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
