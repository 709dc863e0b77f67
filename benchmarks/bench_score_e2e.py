"""Fact scoring end to end, whole processes: `kt-jax score` against the HF PyTorch per-fact reference (CPU).

Run: `.venv/bin/python benchmarks/bench_score_e2e.py [--questions 200] [--reps 3]`

What a user waits for: each side is a fresh Python process that imports its framework, loads the model and the
tokenizer, reads facts.jsonl, scores every fact given its question and writes scored.jsonl.
- HF: `benchmarks/hf_score_reference.py` (LlamaForCausalLM with SDPA, per-fact sequences sorted by length and
  right-padded, batch 16).
- kt-jax: `python -m kt_jax.cli score` with its defaults (template preamble once per row, each question once per
  group of facts, facts as sibling segments, attention inside each group's window).
  "cold" runs with an empty compilation cache (a first run on a new machine), "warm" with the cache the cold run
  filled (every later run: kt-jax enables JAX's persistent compilation cache).
Workload: the held-out Dolly questions (../shared/data/knowtuning/dolly_valid.json; synthetic Dolly-like text when
absent), answers split into sentences as facts; a random ~42M-parameter Llama (8 x 512, vocabulary 16,000, a BPE
trained on the data). Both outputs must give the same perplexities (max relative difference printed). Reported:
median wall seconds over --reps runs each (runs interleaved), and the ratio HF / kt-jax. The floor row bounds what
any implementation of kt-jax's layout could reach here: the process overhead (`kt-jax score` on one fact) plus
the layout's unpadded forward FLOPs at this machine's measured jax matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_scoring import _SENTENCE, load_items  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "knowtuning" / "dolly_valid.json"
LLAMA_42M = dict(common.BENCH_LLAMA_60M, vocab_size=16000, intermediate_size=1376)


def held_out_items(n: int) -> tuple[list[dict], list[str], str]:
    """facts.jsonl rows (question, input, facts), tokenizer training texts, and where they came from."""
    if VALID.is_file():
        rows = json.loads(VALID.read_text(encoding="utf-8"))[:n]
        out = [{"question": r["instruction"], "input": r.get("input", ""),
                "facts": [s.strip() for s in _SENTENCE.split(r["output"].strip()) if s.strip()]} for r in rows]
        texts = [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in rows]
        _, train_texts, _ = load_items(1)  # the tokenizer also learns from the train file when present
        return out, texts + train_texts, f"dolly_valid.json, first {len(out)} questions"
    items, texts, source = load_items(n)
    return [{"question": q, "facts": f} for q, f in items], texts, source


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process (its output is kept only when it fails)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds


def timed_fresh(cmd: list[str], output: Path, env: dict[str, str]) -> float:
    """`timed` after removing `output` and its stamped config, so a `kt-jax score` run starts over (no resume)."""
    for stale in (output, output.with_name(output.stem + ".config.json")):
        stale.unlink(missing_ok=True)
    return timed(cmd, env)


def read_ppl(path: Path) -> np.ndarray:
    """Every fact's perplexity from a scored file, in input order (NaN where null)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return np.array([np.nan if p is None else p for r in rows for p in r["ppl"]], float)


def forward_gflop(facts: Path, model_dir: Path, hf_batch: int) -> tuple[float, float, float, str]:
    """Forward GFLOP each side computes (matmuls, LM head, attention scores/values), kt-jax's layout without any
    padding, and a breakdown line.

    The ceiling of the end-to-end ratio at equal per-FLOP efficiency is their quotient: kt-jax runs the template
    preamble once per row and each question once per group of facts, the LM head only on its gathered positions
    (rounded up per row) and attention inside its windows (padding slots included); HF runs every (prompt, fact)
    sequence padded to its batch's longest, the LM head everywhere. The unpadded count is the same layout's real
    row tokens, the LM head on fact tokens only and each query against only the keys it sees (`floor`).
    """
    from kt_jax.data.templates import alpaca_prompt, encode_pair, question_text
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.score_layout import common_preamble
    from kt_jax.inference.scoring import plan

    tok = load_tokenizer(model_dir)
    dims = common.llama_dims(LLAMA_42M)
    d, layers = dims["d"], dims["layers"]
    per_token = 2 * layers * (2 * d * dims["heads"] * dims["hd"] + 2 * d * dims["kv"] * dims["hd"] + 3 * d * dims["f"])
    head = 2 * d * dims["v"]
    attention = 4 * layers * dims["heads"] * dims["hd"]  # x (query rows x keys) per row
    pairs = []
    for line in facts.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = alpaca_prompt(question_text(row["question"], row.get("input", "")))
        for fact in row["facts"]:
            e = encode_pair(tok, prompt, fact, 1024, add_eos=False)
            pairs.append((e.prompt_ids, e.response_ids))
    calls = plan([p for p in pairs if p[1]])
    kt_tokens = sum(c.inputs.input_ids.size for c in calls)
    kt_head = sum(c.inputs.gather_idx.size for c in calls)
    kt_attn = sum(c.inputs.windows.allowed.size for c in calls)  # query x key slots of every attention window
    lengths = sorted(len(p) + len(r) for p, r in pairs if r)
    batches = [lengths[i : i + hf_batch] for i in range(0, len(lengths), hf_batch)]
    hf_tokens = sum(len(b) * max(b) for b in batches)
    hf_attn = sum(len(b) * max(b) ** 2 for b in batches)
    kt = kt_tokens * per_token + kt_head * head + kt_attn * attention
    p = len(common_preamble([q for q in pairs if q[1]]))  # the preamble each row holds once
    real_tokens = real_head = real_attn = 0
    for call in calls:
        for row in call.rows:
            real_tokens += p + sum(g.length for g in row)
            real_attn += p * (p + 1) // 2
            for g in row:
                n = len(g.prefix)
                real_attn += n * p + n * (n + 1) // 2
                for seg in g.segments:
                    m = len(seg.tokens)
                    real_attn += m * (p + n) + m * (m + 1) // 2
                    real_head += seg.n_loss
    unpadded = real_tokens * per_token + real_head * head + real_attn * attention
    hf = hf_tokens * (per_token + head) + hf_attn * attention
    fact_tokens = sum(len(r) for _, r in pairs)
    line = (f"kt-jax: {kt_tokens} row tokens (incl. padding), LM head at {kt_head} positions ({fact_tokens} fact "
            f"tokens), {kt / 1e9:.0f} GFLOP; HF: {hf_tokens} padded tokens, {hf / 1e9:.0f} GFLOP; FLOP ratio "
            f"{hf / kt:.2f}x; kt-jax without padding: {real_tokens} row tokens, LM head at {real_head} positions, "
            f"{real_attn / 1e6:.2f}M query x key pairs ({kt_attn / 1e6:.2f}M in the windows), "
            f"{unpadded / 1e9:.0f} GFLOP")
    return kt / 1e9, hf / 1e9, unpadded / 1e9, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hf-batch", type=int, default=16)
    args = parser.parse_args()

    from kt_jax.data.tokenizer import train_bpe_tokenizer

    print(f"machine at start: {common.machine_load()}")
    peak = common.matmul_peak()
    print(peak.line())
    rows, texts, source = held_out_items(args.questions)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = common.make_hf_llama(tmp / "llama42m", seed=0, scale=0.02, **LLAMA_42M)
        train_bpe_tokenizer(texts, LLAMA_42M["vocab_size"], model_dir)
        facts = tmp / "facts.jsonl"
        facts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"data: {source}; {sum(len(r['facts']) for r in rows)} facts; model "
              f"{common.llama_dims(LLAMA_42M)}")
        kt_gflop, hf_gflop, floor_gflop, flop_line = forward_gflop(facts, model_dir, args.hf_batch)
        print(flop_line)
        env = {**os.environ, "KT_JAX_COMPILE_CACHE": str(tmp / "jax-cache")}
        hf_out, kt_out = tmp / "hf.jsonl", tmp / "kt.jsonl"
        hf_cmd = [sys.executable, "benchmarks/hf_score_reference.py", "--model", str(model_dir), "--input",
                  str(facts), "--output", str(hf_out), "--batch", str(args.hf_batch)]
        kt_cmd = [sys.executable, "-m", "kt_jax.cli", "score", "--model", str(model_dir), "--input", str(facts),
                  "--output", str(kt_out)]
        # The same command on one fact: imports, model and tokenizer loading, one tiny call (its compile cached
        # by an untimed first run): what a process costs beyond its scoring calls.
        one_fact, one_out = tmp / "one_fact.jsonl", tmp / "one_fact_scored.jsonl"
        one_fact.write_text(json.dumps({**rows[0], "facts": rows[0]["facts"][:1]}) + "\n", encoding="utf-8")
        one_cmd = [*kt_cmd[:kt_cmd.index("--input")], "--input", str(one_fact), "--output", str(one_out)]
        times: dict[str, list[float]] = {"hf": [], "cold": [], "warm": [], "one fact": []}
        for rep in range(args.reps):
            times["hf"].append(timed(hf_cmd, env))
            for kind in (("cold", "warm") if rep == 0 else ("warm",)):
                times[kind].append(timed_fresh(kt_cmd, kt_out, env))
            if rep == 0:
                timed_fresh(one_cmd, one_out, env)  # compiles the one-fact call shape: untimed
            times["one fact"].append(timed_fresh(one_cmd, one_out, env))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if len(v) > rep))
        ref, got = read_ppl(hf_out), read_ppl(kt_out)
        both = np.isfinite(ref) & np.isfinite(got)
        rel = float(np.max(np.abs(got[both] - ref[both]) / ref[both]))
        nan_mismatch = int(np.sum(np.isfinite(ref) != np.isfinite(got)))
    hf = statistics.median(times["hf"])
    table = [["HF PyTorch per fact (hf_score_reference.py)", len(times["hf"]), f"{hf:.1f}", f"{hf_gflop / hf:.0f}",
              "1.00x"]]
    for kind in ("cold", "warm"):
        med = statistics.median(times[kind])
        table.append([f"kt-jax score, {kind} compile cache", len(times[kind]), f"{med:.1f}", f"{kt_gflop / med:.0f}",
                      f"{hf / med:.2f}x"])
    overhead = statistics.median(times["one fact"])
    floor = overhead + floor_gflop * 1e9 / peak.jax
    table.append(["kt-jax score on one fact (process overhead)", len(times["one fact"]), f"{overhead:.1f}", "-",
                  "-"])
    table.append(["floor: overhead + unpadded GFLOP at jax's matmul peak", "-", f"{floor:.1f}",
                  f"{peak.jax / 1e9:.0f}", f"{hf / floor:.2f}x"])
    print()
    common.print_table(["process", "runs", "median wall s", "forward GFLOP/s (whole process)", "speedup vs HF"],
                       table)
    print(f"at equal GFLOP/s the ratio would be the FLOP ratio, {hf_gflop / kt_gflop:.2f}x; the floor row is the "
          f"best this layout allows on this machine (every matmul, attention included, at the 2048^3 rate)")
    print(f"\nmax relative ppl difference kt-jax vs HF: {rel:.1e} ({nan_mismatch} facts null on one side only)")
    print(f"machine at end: {common.machine_load()}")
    warm = hf / statistics.median(times["warm"])
    print(f"end-to-end kt-jax score vs HF (warm cache; goal 3x): {warm:.2f}x")
    return 0 if nan_mismatch == 0 and rel < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
