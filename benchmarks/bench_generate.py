"""Decode throughput: kt-jax KV-cache generation vs HF PyTorch `generate` on the same CPU.

Run: `.venv/bin/python benchmarks/bench_generate.py [--layers 8 --hidden 512 --vocab 32000] [--new 128]`

Model: a random Llama (HF LlamaForCausalLM, float32) saved locally and loaded by both sides.
Rows of the table, per batch size: prompt tokens, new tokens (every row runs to the limit: no EOS),
wall seconds of the generation call (after one warm-up call, so compile time is reported apart),
decode tokens/s (batch x new tokens / seconds) for greedy and for the KnowTuning sampling preset.
First: this machine's float32 matmul rates with jax and with torch (`common.matmul_peak`); per row the achieved
FLOP/s (2 x params per token) and its % of that library's rate.
Note whether other processes were busy when you read the numbers (printed: load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args()

    import jax
    import torch
    import transformers
    from common import make_hf_llama, matmul_peak  # benchmarks/ is on sys.path: this script's folder

    from kt_jax.inference.sampling import SamplingConfig, generate_ids
    from kt_jax.model.hf import load_pretrained

    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(peak.line(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    heads = args.hidden // 64
    cfg = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
               num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
               max_position_embeddings=4096, tie_word_embeddings=False)
    path = make_hf_llama(tmp / "model", seed=0, scale=0.02, **cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in hf.parameters())
    ours = load_pretrained(path)
    print(f"model: {args.layers} layers, d={args.hidden}, vocab {args.vocab}, {params / 1e6:.1f}M params (float32); "
          f"prompt {args.prompt}, new {args.new}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({args.threads} threads); load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    rng = np.random.default_rng(0)
    header = (f"{'impl':28s} {'batch':>5s} {'decoding':>10s} {'compile s':>9s} {'run s':>7s} {'tok/s':>8s} "
              f"{'GFLOP/s':>8s} {'% peak':>6s}")
    print(header)
    print("-" * len(header))
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(3, args.vocab, size=(batch, args.prompt)).tolist()
        tokens = batch * args.new
        for name, sampling in (("greedy", SamplingConfig.greedy(args.new)),
                               ("knowtuning", SamplingConfig.knowtuning(args.new))):
            run = lambda s=sampling: generate_ids(ours, prompts, s, eos_ids=(), batch_size=batch)  # noqa: B023
            compile_s = _timed(run)
            secs = min(_timed(run) for _ in range(2))
            flops = 2 * params * tokens / secs
            print(f"{'kt-jax (jit while_loop)':28s} {batch:5d} {name:>10s} {compile_s - secs:9.1f} {secs:7.2f} "
                  f"{tokens / secs:8.1f} {flops / 1e9:8.1f} {100 * flops / peak.jax:5.1f}%")
            ids = torch.tensor(prompts)
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
            kw |= ({"do_sample": False} if name == "greedy" else
                   {"do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50})
            with torch.no_grad():
                hf.generate(ids, **kw)  # warm-up
                secs = min(_timed(lambda: hf.generate(ids, **kw)) for _ in range(2))  # noqa: B023
            flops = 2 * params * tokens / secs
            print(f"{'HF torch generate':28s} {batch:5d} {name:>10s} {'-':>9s} {secs:7.2f} {tokens / secs:8.1f} "
                  f"{flops / 1e9:8.1f} {100 * flops / peak.torch:5.1f}%")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
