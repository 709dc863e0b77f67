"""The HF PyTorch reference for `kt-jax score`, as a whole process: per-fact perplexity given the question.

Run: `python benchmarks/hf_score_reference.py --model DIR --input facts.jsonl --output scored.jsonl [--batch 16]`

What a user without kt-jax would write: `LlamaForCausalLM` (SDPA attention), one sequence per (prompt, fact),
sequences sorted by length and right-padded in batches, log_softmax + gather over the fact tokens. The token ids are
kt-jax's (`templates.encode_pair`: alpaca prompt with BOS, the fact as a continuation, no EOS, cut to --max-len) so
both outputs score exactly the same tokens; the tokenizer code does not import jax. Output rows: the input row plus
`ppl` (one float per fact, null for a fact without tokens), as `kt-jax score` writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward")
    parser.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args()
    from kt_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # the malloc settings `kt-jax score` runs under, so both processes allocate alike

    import torch
    import transformers

    from kt_jax.data.templates import alpaca_prompt, encode_pair, question_text
    from kt_jax.data.tokenizer import load_tokenizer

    rows = [json.loads(line) for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = load_tokenizer(args.model)
    pairs, where = [], []
    for i, row in enumerate(rows):
        prompt = alpaca_prompt(question_text(row["question"], row.get("input", "")))
        for j, fact in enumerate(row["facts"]):
            e = encode_pair(tok, prompt, fact, args.max_len, add_eos=False)
            pairs.append((e.prompt_ids, e.response_ids))
            where.append((i, j))
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    order = sorted((k for k in range(len(pairs)) if pairs[k][1]), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
    logp_sum = [math.nan] * len(pairs)
    with torch.inference_mode():
        for s in range(0, len(order), args.batch):
            batch = order[s : s + args.batch]
            seqs = [pairs[k][0] + pairs[k][1] for k in batch]
            t = max(len(q) for q in seqs)
            ids = torch.full((len(batch), t), tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), t), dtype=torch.long)
            for b, q in enumerate(seqs):
                ids[b, : len(q)], mask[b, : len(q)] = torch.tensor(q), 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
            for b, k in enumerate(batch):
                p, n = len(pairs[k][0]), len(pairs[k][1])
                logp_sum[k] = float(logp[b, p - 1 : p + n - 1].gather(-1, ids[b, p : p + n, None]).double().sum())
    ppl: list[list[float | None]] = [[None] * len(r["facts"]) for r in rows]
    for k, (i, j) in enumerate(where):
        if pairs[k][1]:
            ppl[i][j] = math.exp(-logp_sum[k] / len(pairs[k][1]))
    with open(args.output, "w", encoding="utf-8") as fh:
        for row, row_ppl in zip(rows, ppl, strict=True):
            fh.write(json.dumps({**row, "ppl": row_ppl}) + "\n")
    print(f"wrote {args.output}: {len(rows)} rows, {len(pairs)} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
