"""Fact-perplexity scoring throughput: HF PyTorch per fact vs kt-jax padded vs kt-jax packed + prefix-shared (CPU).

Run: `.venv/bin/python benchmarks/bench_scoring.py [--questions 300] [--quick]`

Model: a ~58M-parameter Llama (Llama-2 vocabulary 32000, 8 layers x 512; random init, saved as a HF checkpoint).
Data: the first N Dolly questions of ../shared/data/knowtuning/dolly_train.json (instruction + context), answers
split into sentences as facts; synthetic text with Dolly-like lengths when the file is absent. Tokenizer: a 32k
byte-level BPE trained on the data. Every method scores the same (alpaca prompt, fact) token ids
(`templates.encode_pair`, no EOS, max 1024 tokens).
- (a) HF PyTorch `LlamaForCausalLM`, one sequence per (prompt, fact), batched and right-padded (pairs sorted by
  length to keep padding low), log_softmax + gather of the fact tokens; the reference.
- (b) kt-jax `packing="padded"`: one (prompt, fact) per row, length-bucketed.
- (c) kt-jax `packing="shared"`: the prompt once per question, facts as sibling segments, rows packed to 512.
Useful tokens = prompt + fact tokens of every pair (what the per-fact method needs). Achieved FLOP/s counts the
forward FLOPs each method executes (its actual [B, T] shapes, full T x T attention, LM head where it runs)
over this machine's measured float32 matmul peak (best of jax and torch); kt-jax runs the LM head only on scored
positions, HF on every position. Compile time is measured separately (a warm-up over every call shape) and
excluded from the timed runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowtuning" / "dolly_train.json"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def load_items(n: int) -> tuple[list[tuple[str, list[str]]], list[str], str]:
    """(question, sentence facts) items, tokenizer training texts, and a description of the source."""
    import json

    if REAL.is_file():
        rows = json.loads(REAL.read_text(encoding="utf-8"))
        texts = [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in rows]
        items = []
        for r in rows[:n]:
            question = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
            facts = [s.strip() for s in _SENTENCE.split(r["output"].strip()) if s.strip()]
            items.append((question, facts))
        return items, texts, f"dolly_train.json, first {len(items)} questions"
    rng = np.random.default_rng(0)
    vocab = "the of and a to in is was for on that with as by at from it an be this which or are his her their capital"
    words = re.findall(r"\w+", vocab + " city river king queen water answer question music film team game school")
    text = lambda mean_words: " ".join(rng.choice(words, max(1, int(rng.lognormal(np.log(mean_words), 0.7)))))
    items = [(text(12).capitalize() + "?", [text(16).capitalize() + "." for _ in range(int(rng.integers(1, 9)))])
             for _ in range(n)]
    texts = [q + " " + " ".join(f) for q, f in items]
    return items, texts, f"synthetic, {n} questions (Dolly-like lengths)"


def hf_scores(model_dir: Path, pairs: list[tuple[list[int], list[int]]], batch_size: int,
              pad_id: int) -> tuple[list[float], float, float]:
    """(summed fact log-probs, seconds, executed FLOPs) with HF PyTorch, batched and right-padded."""
    import torch
    import transformers

    cfg = __import__("json").loads((model_dir / "config.json").read_text())
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)

    def run(rows: list[int]) -> float:
        seqs = [pairs[i][0] + pairs[i][1] for i in rows]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
            for j, i in enumerate(rows):
                p, n = len(pairs[i][0]), len(pairs[i][1])
                targets = ids[j, p : p + n]
                out[i] = float(logp[j, p - 1 : p + n - 1].gather(-1, targets[:, None]).double().sum())
        return common.forward_flops(cfg, len(rows) * t, t)

    run(order[:batch_size])  # warm-up
    flops, t0 = 0.0, time.perf_counter()
    for s in range(0, len(order), batch_size):
        flops += run(order[s : s + batch_size])
    return out, time.perf_counter() - t0, flops


def kt_scores(model, pairs, *, packing: str, batch_size: int, pack_len: int, max_len: int) -> tuple[list[float], float,
                                                                                                      float, float]:
    """(summed fact log-probs, seconds, executed FLOPs, warm-up/compile seconds) with kt-jax."""
    from kt_jax.inference import scoring

    opts = dict(max_len=max_len, packing=packing, batch_size=batch_size, pack_len=pack_len)
    calls = scoring.plan(pairs, **opts)
    flops = 0.0
    for c in calls:  # attention: every query x key slot of the call's windows
        tokens, window_slots = c.inputs.input_ids.size, c.inputs.windows.allowed.size
        flops += common.forward_flops(model.config, tokens, window_slots / tokens,
                                      lm_head_tokens=c.inputs.gather_idx.size)
    t0 = time.perf_counter()  # warm-up: compile every call shape the timed run uses
    shapes = scoring.warmup(model, calls)
    compile_s = time.perf_counter() - t0
    print(f"{packing}: {len(calls)} calls, {shapes} compiled shapes in {compile_s:.1f} s")
    t0 = time.perf_counter()
    out = scoring.score_encoded(model, pairs, **opts)
    return [s for s, _ in out], time.perf_counter() - t0, flops, compile_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="40 questions, 100 baseline pairs (a smoke run)")
    parser.add_argument("--baseline-pairs", type=int, default=200,
                        help="(a) and (b) score this many pairs, evenly spaced over the length order (0 = all)")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--hf-batch", type=int, default=16, help="HF sequences per forward")
    parser.add_argument("--padded-batch", type=int, default=16, help="kt-jax padded rows per call")
    parser.add_argument("--shared-batch", type=int, default=1, help="kt-jax packed rows per call")
    parser.add_argument("--pack-len", type=int, default=4096, help="kt-jax tokens per packed row")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads for (a)")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    n = 40 if args.quick else args.questions
    n_base = 100 if args.quick else args.baseline_pairs

    import jax

    from kt_jax.data.templates import alpaca_prompt, encode_pair
    from kt_jax.data.tokenizer import train_bpe_tokenizer
    from kt_jax.model.hf import load_pretrained

    print(f"machine at start: {common.machine_load()}; jax devices: {jax.devices()}")
    items, texts, source = load_items(n)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_hf_llama(Path(tmp) / "llama60m", seed=0, scale=0.02, **common.BENCH_LLAMA_60M)
        tok = train_bpe_tokenizer(texts, 32000, model_dir)
        encoded = [encode_pair(tok, alpaca_prompt(q), f, args.max_len, add_eos=False) for q, facts in items
                   for f in facts]
        pairs = [(e.prompt_ids, e.response_ids) for e in encoded]
        useful = sum(len(p) + len(r) for p, r in pairs)
        n_params = common.llama_dims(common.BENCH_LLAMA_60M)
        print(f"data: {source}; {len(pairs)} facts, {useful} useful tokens (mean prompt "
              f"{np.mean([len(p) for p, _ in pairs]):.0f}, mean fact {np.mean([len(r) for _, r in pairs]):.1f} tokens, "
              f"{sum(e.truncated for e in encoded)} truncated); model {n_params}")
        peak = common.matmul_peak()
        print(peak.line())

        by_len = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
        take = len(pairs) if not n_base or n_base >= len(pairs) else n_base
        sample = sorted(by_len[int(k * len(pairs) / take)] for k in range(take))
        base_pairs = [pairs[i] for i in sample]
        print(f"(a) and (b) score {len(sample)} of the {len(pairs)} pairs (evenly spaced in length order); (c) all")
        results = {}
        hf, hf_s, hf_flops = hf_scores(model_dir, base_pairs, args.hf_batch, tok.pad_id)
        results["(a) HF PyTorch per fact, padded"] = (sample, hf, hf_s, hf_flops, 0.0)
        model = load_pretrained(model_dir)
        results["(b) kt-jax padded"] = (sample, *kt_scores(model, base_pairs, packing="padded",
                                                           batch_size=args.padded_batch, pack_len=args.pack_len,
                                                           max_len=args.max_len))
        results["(c) kt-jax packed + prefix-shared"] = (list(range(len(pairs))), *kt_scores(
            model, pairs, packing="shared", batch_size=args.shared_batch, pack_len=args.pack_len,
            max_len=args.max_len))
    counts = np.array([len(r) for _, r in pairs], float)
    tokens = np.array([len(p) + len(r) for p, r in pairs], float)
    ppl_ref = np.exp(-np.array(hf) / counts[sample])
    hf_rate = tokens[sample].sum() / hf_s
    rows = []
    for name, (which, logp, seconds, flops, compile_s) in results.items():
        ppl = np.exp(-np.array(logp) / counts[which])
        ppl_on_sample = ppl if which is sample else ppl[sample]
        rel = np.abs(ppl_on_sample - ppl_ref) / ppl_ref
        rate = tokens[which].sum() / seconds
        rows.append([name, len(which), f"{seconds:.1f}", f"{rate:,.0f}", f"{rate / hf_rate:.2f}x",
                     f"{rel.max():.1e}", f"{flops / seconds / 1e9:.1f}", f"{100 * flops / seconds / peak.best:.0f}%",
                     f"{compile_s:.1f}"])
    print()
    common.print_table(["method", "facts", "seconds", "useful tok/s", "vs (a)", "max rel ppl diff vs (a)",
                        "exec GFLOP/s", "of peak", "compile s"], rows)
    print(f"\nmachine at end: {common.machine_load()}")
    c = results["(c) kt-jax packed + prefix-shared"]
    target = tokens.sum() / c[2] / hf_rate
    print(f"target (c) >= 3x (a): {'met' if target >= 3 else 'NOT met'} ({target:.2f}x)")
    assert all(math.isfinite(x) for x in ppl_ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
