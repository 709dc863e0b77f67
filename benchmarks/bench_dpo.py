"""DPO train steps on a KC-shaped workload: grouped preference rows against one chosen + one rejected row per pair.

Run: `.venv/bin/python benchmarks/bench_dpo.py [--quick] [--steps 4] [--groups 8] [--rejected 3]
      [--finetuning lora|full] [--layers 8] [--hidden 512] [--vocab 16000] [--buckets 128,256,512,1024,2048,4096]`

Workload: `--groups` questions per step, each with one chosen and `--rejected` rejected answers (KnowTuning's KC
set: completeness, factuality, logicality), question ~8 words (the alpaca prompt ~30 tokens with this word-level
tokenizer), answers 80-150 tokens; reference log-probs stored, as kt-jax trains. Both layouts come from the real
loader (`kt_jax.data.loader.make_dataset`, `group_preferences` on / off) over the same records and hold the same
pairs per step (per-pair batch size = groups x rejected), so the step time ratio is the pair throughput ratio;
their timed steps alternate (per-pair, grouped, per-pair, ...), so a job sharing the cores slows both alike.
Row lengths follow `data.buckets` (default: `DataConfig`'s, which the shipped configs use): per-pair rows the bucket
of the longest pair, grouped rows the bucket of the longest question, several questions to a row where they fit.
Model: a random ~42M-parameter Llama (d=512, 8 layers, SwiGLU 1376, vocab 16k, untied), LoRA r=8 on q,v by default
(as KnowTuning's DPO); one step = forward + backward + clip + AdamW (`kt_jax.train.steps.make_train_step`), float32.
The machine's jax and torch float32 2048^3 matmul rates print first: compare numbers only within one run.
`--quick` shrinks the model and steps to a smoke check (its ratio says little: measure on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class WordTokenizer:
    """Whitespace words hashed into the vocabulary (stable across runs); 1 = BOS, 2 = EOS, 0 = pad."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def kc_records(groups: int, rejected: int, vocab: int, seed: int = 0) -> list:
    """`groups` questions x `rejected` KC records sharing the question and chosen answer, in group order."""
    from kt_jax.data.records import KCRecord

    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(f"t{int(x)}" for x in rng.integers(0, vocab, n))
    aspects = ("completeness", "factuality", "logicality")
    out = []
    for _ in range(groups):
        question, chosen = words(8), words(int(rng.integers(80, 151)))
        for k in range(rejected):
            out.append(KCRecord(question, chosen, words(int(rng.integers(80, 151))), aspects[k % 3],
                                ref_chosen_logp=float(-rng.uniform(900, 1100)),
                                ref_rejected_logp=float(-rng.uniform(900, 1100))))
    return out


def layout(args: argparse.Namespace, grouped: bool) -> tuple[Callable[[], Any], dict[str, Any]]:
    """(one train step of this layout, returning its metrics once done; the batch's sizes)."""
    import jax
    from flax import nnx

    from kt_jax.data.batch import Task
    from kt_jax.data.loader import DataConfig, make_dataset
    from kt_jax.model.llama import Llama, LlamaConfig
    from kt_jax.model.lora import LoRAConfig, apply_lora
    from kt_jax.train.config import DPOConfig, OptimConfig
    from kt_jax.train.loop import stack_micro, to_device
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_dpo_loss, make_train_step

    recs = kc_records(args.groups, args.rejected, args.vocab)
    pairs = args.groups * args.rejected  # data.batch_size counts pairs in both layouts
    cfg = DataConfig(max_len=args.max_len, batch_size=pairs, shuffle=False, group_preferences=grouped,
                     group_pairs=args.rejected, buckets=args.buckets)
    batch = next(iter(make_dataset(recs, WordTokenizer(args.vocab), cfg, task=Task.DPO)))
    model = Llama(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                              num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                              dtype="float32"), nnx.Rngs(0))
    if args.finetuning == "lora":
        apply_lora(model, LoRAConfig())
    tx = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
    ts = create_state(model, tx)
    step = make_train_step(ts, tx, make_dpo_loss(DPOConfig(sft_weight=0.2), args.chunk))
    micro = to_device(stack_micro([batch]), None)

    def one_step() -> Any:
        ts.params, ts.opt_state, metrics = step(ts.params, ts.opt_state, ts.frozen, micro)
        return jax.block_until_ready(metrics)

    ids = batch.seq.input_ids if grouped else batch.chosen.input_ids
    pairs = int(np.sum(batch.chosen_seg > 0)) if grouped else int(np.sum(batch.chosen.segment_ids.max(1) > 0))
    shape = f"{ids.shape[0]}x{ids.shape[1]}" if grouped else f"2x{ids.shape[0]}x{ids.shape[1]}"
    return one_step, {"padded": ids.size * (2 - grouped), "pairs": pairs, "shape": shape}


def step_times(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-pair and grouped results (median s/step, sizes, tokens, loss): the layouts' steps alternate, so other
    jobs on the cores slow both alike and the ratio holds up (each step compiles on its first call, not timed)."""
    steps = {grouped: layout(args, grouped) for grouped in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    metrics = {grouped: run() for grouped, (run, _) in steps.items()}  # compile
    for _ in range(args.steps):
        for grouped, (run, _) in steps.items():
            t0 = time.perf_counter()
            metrics[grouped] = run()
            times[grouped].append(time.perf_counter() - t0)
    out = [{**info, "seconds": float(np.median(times[g])), "tokens": float(metrics[g]["tokens"]),
            "loss": float(metrics[g]["loss"])} for g, (_, info) in steps.items()]
    return out[0], out[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model and 2 steps: a smoke check only")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rejected", type=int, default=3)
    p.add_argument("--finetuning", default="lora", choices=["lora", "full"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--buckets", type=lambda s: tuple(int(x) for x in s.split(",")),
                   default="128,256,512,1024,2048,4096", help="data.buckets (row lengths), comma-separated")
    args = p.parse_args()
    if args.quick:
        args.steps, args.groups, args.layers, args.hidden, args.ffn, args.heads, args.vocab = 2, 4, 2, 128, 344, 4, 4000
    import common

    load0 = os.getloadavg()
    print(common.matmul_peak().line(), flush=True)
    n_params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.ffn) + 2 * args.vocab * args.hidden
    print(f"model ~{n_params / 1e6:.1f}M params ({args.finetuning}), {args.groups} questions x {args.rejected} pairs "
          f"per step, max_len {args.max_len}, buckets {list(args.buckets)}, {os.cpu_count()} CPUs, load avg before "
          f"{load0[0]:.1f}" + (" [--quick]" if args.quick else ""))
    per_pair, grouped = step_times(args)
    print("| layout | rows x T | pairs/step | tokens/step (real) | tokens/step (padded) | s/step | pairs/s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("per-pair (chosen + rejected rows)", per_pair), ("grouped (shared prompt + chosen)", grouped)):
        print(f"| {name} | {r['shape']} | {r['pairs']} | {r['tokens']:.0f} | {r['padded']} | {r['seconds']:.3f} | "
              f"{r['pairs'] / r['seconds']:.1f} | {r['loss']:.4f} |")
    print(f"load avg after {os.getloadavg()[0]:.1f} (before {load0[0]:.1f}); other jobs share these cores")
    speedup = (grouped["pairs"] / grouped["seconds"]) / (per_pair["pairs"] / per_pair["seconds"])
    print(f"grouped vs per-pair DPO step, pairs/s on the same {grouped['pairs']} pairs: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
