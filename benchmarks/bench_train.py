"""Training throughput: kt-jax SFT (full, LoRA) and DPO vs HF transformers + peft (PyTorch) on the same CPU.

Run: `.venv/bin/python benchmarks/bench_train.py [--steps 4] [--layers 8] [--hidden 512] [--vocab 16000]
      [--batch 8] [--seq 256] [--dtype float32|bfloat16] [--skip-torch]`

Model: a random Llama (d=512, 8 layers, 8 heads, SwiGLU 1376, vocab 16k, untied: ~42M parameters), batch 8 x 256
tokens for SFT; DPO uses 4 pairs x 256 per side = the same 2048 tokens. Every row is full (no padding); the loss
covers the second half of each row (a response). One step = forward + backward + clip + AdamW.
- kt-jax: the real training step (`kt_jax.train.steps.make_train_step`), one device (the process's default).
  DPO reads stored reference log-probs (no reference forward per step), as kt-jax trains.
- PyTorch: transformers LlamaForCausalLM (+ peft LoRA r=8/alpha=16 on q,v), torch.optim.AdamW, clip 1.0;
  DPO as TRL 0.7.11 does it: one policy forward on chosen+rejected concatenated, plus a no-grad reference forward
  (the base with adapters disabled) every step.
FLOPs per token: 6N (full) or 4N (LoRA: no weight gradients) with N the matmul parameters (embedding lookup
excluded, LM head included), plus attention 12·L·T·d (full T x T scores, fwd + bwd). DPO's reference forward in
PyTorch is extra work not counted in the FLOP/s (it is in its step time).
Both float32 matmul peaks (jax and torch, 2048^3) and the machine's load average are printed first: other jobs
on the same cores lower every number. The two sides' steps alternate (kt-jax, PyTorch, kt-jax, ...) and each
side's median over --steps is reported, so a machine that speeds up or slows down during the run (common on shared
2-core VMs) moves both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def flops_per_token(args: argparse.Namespace, lora: bool) -> float:
    d, f, L, v, t = args.hidden, args.ffn, args.layers, args.vocab, args.seq
    n = L * (4 * d * d + 3 * d * f) + d * v
    return (4 if lora else 6) * n + 12 * L * t * d


def sft_rows(args: argparse.Namespace, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = args.seq
    ids = rng.integers(3, args.vocab, (rows, t)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    mask = np.zeros((rows, t), np.float32)
    mask[:, t // 2 : t - 1] = 1.0
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "positions": pos,
            "segment_ids": np.ones((rows, t), np.int32)}


def pref_batch(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pairs = args.batch // 2
    out = {f"chosen_{k}": v for k, v in sft_rows(args, pairs, rng).items()}
    out.update({f"rejected_{k}": v for k, v in sft_rows(args, pairs, rng).items()})
    out["ref_chosen_logps"] = -rng.uniform(900, 1100, pairs).astype(np.float32)
    out["ref_rejected_logps"] = -rng.uniform(900, 1100, pairs).astype(np.float32)
    return out


def jax_stepper(args: argparse.Namespace, mode: str, hf_dir: Path) -> Callable[[], None]:
    """One kt-jax train step per call, blocking until done (mode: full | lora | dpo); compiled before it returns."""
    import jax
    import jax.numpy as jnp

    from kt_jax.data.batch import PreferenceBatch, SeqBatch
    from kt_jax.model.hf import load_pretrained
    from kt_jax.model.lora import LoRAConfig, apply_lora
    from kt_jax.train.config import DPOConfig, OptimConfig
    from kt_jax.train.loop import stack_micro, to_device
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step

    model = load_pretrained(hf_dir, dtype=getattr(jnp, args.dtype), param_dtype=jnp.float32,
                            backward_dots=args.backward_dots)
    if mode in ("lora", "dpo"):
        apply_lora(model, LoRAConfig())
    tx = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
    ts = create_state(model, tx)
    loss_fn = make_dpo_loss(DPOConfig(), args.chunk) if mode == "dpo" else make_sft_loss(args.chunk)
    step = make_train_step(ts, tx, loss_fn)
    rng = np.random.default_rng(0)
    batch = pref_batch(args, rng) if mode == "dpo" else sft_rows(args, args.batch, rng)
    side = lambda p: SeqBatch(**{k[len(p):]: v for k, v in batch.items() if k.startswith(p)})
    typed = (PreferenceBatch(side("chosen_"), side("rejected_"), batch["ref_chosen_logps"], batch["ref_rejected_logps"])
             if mode == "dpo" else SeqBatch(**batch))
    micro = to_device(stack_micro([typed]), None)

    def one_step() -> None:
        ts.params, ts.opt_state, metrics = step(ts.params, ts.opt_state, ts.frozen, micro)
        jax.block_until_ready(metrics["loss"])

    one_step()  # compiles
    return one_step


def torch_stepper(args: argparse.Namespace, mode: str, hf_dir: Path) -> Callable[[], None]:
    """One PyTorch step per call (transformers + peft), same model, batch and optimizer; warmed up once."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.config.use_cache = False
    if mode in ("lora", "dpo"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    rng = np.random.default_rng(0)
    batch = pref_batch(args, rng) if mode == "dpo" else sft_rows(args, args.batch, rng)

    def logps(ids: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
        return (lp * mask).sum(-1), mask.sum(-1)

    T = lambda k: torch.from_numpy(np.ascontiguousarray(batch[k])).long()
    M = lambda k: torch.from_numpy(batch[k])

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        if mode == "dpo":
            ids = torch.cat([T("chosen_input_ids"), T("rejected_input_ids")])
            tgt = torch.cat([T("chosen_targets"), T("rejected_targets")])
            mask = torch.cat([M("chosen_loss_mask"), M("rejected_loss_mask")])
            with torch.no_grad(), model.disable_adapter():
                ref, _ = logps(ids, tgt, mask)
            pol, n = logps(ids, tgt, mask)
            b = ids.shape[0] // 2
            delta = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
            loss = (-torch.nn.functional.logsigmoid(0.1 * delta) + 0.2 * (-pol[:b] / n[:b])).mean()
        else:
            s, n = logps(T("input_ids"), T("targets"), M("loss_mask"))
            loss = -s.sum() / n.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    one_step()
    return one_step


def interleaved_medians(steppers: list[Callable[[], None]], rounds: int) -> list[float]:
    """Median seconds per call of each stepper, called in turn round after round, so that a change in the machine's
    speed during the run (other jobs, clock changes) reaches every side alike."""
    times: list[list[float]] = [[] for _ in steppers]
    for _ in range(rounds):
        for fn, out in zip(steppers, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="kt-jax compute dtype")
    p.add_argument("--modes", default="full,lora,dpo")
    p.add_argument("--backward-dots", default="auto", choices=["auto", "explicit", "autodiff"],
                   help="kt-jax's matmul backward (kt_jax.ops.matmul); auto = explicit on CPU")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()
    import tempfile

    from common import make_hf_llama  # benchmarks/ is on sys.path: this script's folder

    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    hf_dir = make_hf_llama(tmp / "model", seed=0, scale=0.02, vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.heads, max_position_embeddings=max(512, args.seq))
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from common import matmul_peak

    peak = matmul_peak()
    print(peak.line(), flush=True)
    tokens = args.batch * args.seq
    n_params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.ffn) + 2 * args.vocab * args.hidden
    print(f"model ~{n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} = {tokens} tokens/step, "
          f"kt-jax compute {args.dtype}, {os.cpu_count()} CPUs, "
          f"load avg before {load0[0]:.1f}")
    rows = []
    for mode in args.modes.split(","):
        lora = mode != "full"
        steppers = [jax_stepper(args, mode, hf_dir)] + ([] if args.skip_torch else [torch_stepper(args, mode, hf_dir)])
        jt, *tt = interleaved_medians(steppers, args.steps)
        rows.append((mode, jt, tt[0] if tt else None, flops_per_token(args, lora) * tokens))
        del steppers
    print(f"\n| step ({tokens} tok) | kt-jax s/step | kt-jax tok/s | kt-jax % peak | PyTorch s/step | PyTorch tok/s "
          f"| PyTorch % peak | kt-jax / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, jt, tt, fl in rows:
        name = {"full": "SFT full", "lora": "SFT LoRA q,v r8", "dpo": "DPO LoRA (+γ NLL)"}[mode]
        torch_cols = "| - | - | - | -" if tt is None else (
            f"| {tt:.2f} | {tokens / tt:.0f} | {100 * fl / tt / peak.torch:.0f}% | {tt / jt:.2f}x")
        print(f"| {name} | {jt:.2f} | {tokens / jt:.0f} | {100 * fl / jt / peak.jax:.0f}% {torch_cols} |")
    times = {m: (jt, tt) for m, jt, tt, _ in rows}
    if "dpo" in times and "lora" in times:
        jd, td = times["dpo"][0] / times["lora"][0], None
        if times["dpo"][1] and times["lora"][1]:
            td = times["dpo"][1] / times["lora"][1]
        print(f"\nDPO / SFT(LoRA) step time, same tokens: kt-jax {jd:.2f}" + (f", PyTorch {td:.2f}" if td else ""))
    print(f"load avg after {os.getloadavg()[0]:.1f} (before {load0[0]:.1f}); other jobs share these cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
