"""One GPU check (at most ~8 minutes on one H100/H200-class GPU): attention parity, a 1B-class bf16 SFT and DPO
step with MFU, and fact scoring against HF PyTorch; prints one table.

Run on the GPU machine:  `python benchmarks/gpu_check.py [--json out.json]`
Smoke run anywhere (tiny sizes, CPU; what tests/test_gpu_check.py executes):  `python benchmarks/gpu_check.py --smoke`

1. Attention: `kt_jax.model.attention.attention` on packed segments, backend `cudnn` (jax.nn.dot_product_attention,
   cuDNN) against `xla` (dense masked softmax): forward and q/k/v-gradient max abs error, bf16. On a CPU (smoke)
   there is no cuDNN: the row compares `xla` with jax.nn.dot_product_attention(implementation="xla") on the same
   mask and says so.
2. Train steps: a Llama-3.2-1B-shaped model (random weights, vocab 128256, d 2048, 16 layers, GQA 32/8, tied),
   bf16 compute, float32 params, full fine-tuning, the real `train.steps.make_train_step` (SFT: 8 x 2048 tokens;
   DPO: 4 pairs x 2048 per side), attention `auto`. MFU = XLA's compiled FLOPs (cost_analysis) / median step
   time / the GPU's dense bf16 peak (H100/H200 989 TFLOP/s, A100 312).
3. Scoring: `inference.scoring.score_encoded` (prefix-shared packing) on a random HF Llama in float32 against
   transformers' LlamaForCausalLM (torch, on CUDA when torch sees one): max abs error of per-fact summed log-probs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
SIZES = {  # attention (B, T, H, D), train rows x length, steps timed, scoring pairs, HF model overrides
    "full": {"attn": (4, 2048, 16, 128), "model": LLAMA_1B, "rows": 8, "length": 2048, "steps": 5, "pairs": 64,
             "hf": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=32000)},
    "smoke": {"attn": (2, 128, 4, 16), "model": TINY, "rows": 2, "length": 64, "steps": 2, "pairs": 8, "hf": {}},
}


def bf16_peak(device: Any) -> float | None:
    """Dense bf16 FLOP/s of a known GPU from its device_kind, else None."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in GPU_BF16_PEAK.items() if k in kind), None) if device.platform == "gpu" else None


def packed_segments(rows: int, length: int, segments: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) [rows, length]: `segments` packed segments per row, the tail padding (0)."""
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    bounds = np.linspace(0, length - length // 8, segments + 1).astype(int)
    for s in range(segments):
        seg[:, bounds[s]:bounds[s + 1]] = s + 1
        pos[:, bounds[s]:bounds[s + 1]] = np.arange(bounds[s + 1] - bounds[s])
    return seg, pos


def check_attention(size: dict[str, Any]) -> list[list[Any]]:
    """cuDNN vs XLA attention (forward, gradients) on packed segments."""
    import jax
    import jax.numpy as jnp

    from kt_jax.model.attention import attention, attention_mask

    b, t, h, d = size["attn"]
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype) for kk in keys)
    seg = jnp.asarray(packed_segments(b, t)[0])

    def xla(q, k, v):
        return attention(q, k, v, seg, backend="xla")

    def other(q, k, v):
        if on_gpu:
            return attention(q, k, v, seg, backend="cudnn")
        mask = attention_mask(seg, None, b, t)[:, None]  # [B, 1, T, T]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla").astype(q.dtype)

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct), argnums=(0, 1, 2)))

    valid = (seg > 0)[:, :, None, None]  # padding rows attend to padding: outside every loss, not compared
    fwd = float(jnp.max(jnp.abs(jnp.where(valid, jax.jit(xla)(q, k, v) - jax.jit(other)(q, k, v), 0))))
    grads = [float(jnp.max(jnp.abs(jnp.where(valid, a.astype(jnp.float32) - c.astype(jnp.float32), 0))))
             for a, c in zip(loss(xla)(q, k, v), loss(other)(q, k, v), strict=True)]
    name = "cudnn vs xla" if on_gpu else "xla vs jax.nn xla (no cuDNN on cpu)"
    tol = (2e-2, 5e-2) if on_gpu else (1e-5, 1e-4)
    return [[f"attention {name} fwd", f"B{b} T{t} H{h} D{d} {jnp.dtype(dtype).name}", f"{fwd:.2e}",
             "ok" if fwd <= tol[0] else "FAIL"],
            [f"attention {name} grad", "max over dq, dk, dv", f"{max(grads):.2e}",
             "ok" if max(grads) <= tol[1] else "FAIL"]]


def _train_batch(task: Any, rows: int, length: int) -> Any:
    from kt_jax.data.batch import PreferenceBatch, SeqBatch

    seg, pos = packed_segments(rows, length)
    ids = np.random.default_rng(0).integers(3, 250, (1, rows, length)).astype(np.int32)
    mask = np.where(pos[None] > 4, 1.0, 0.0).astype(np.float32) * (seg[None] > 0)
    seq = SeqBatch(ids, np.roll(ids, -1, axis=-1), mask, pos[None], seg[None])
    if not task.preference:
        return seq
    ref = np.full((1, rows), -50.0, np.float32)
    return PreferenceBatch(seq, SeqBatch(np.flip(ids, -1).copy(), *list(seq.as_dict().values())[1:]), ref, ref)


def check_train(size: dict[str, Any]) -> list[list[Any]]:
    """SFT and DPO step time, XLA FLOPs and MFU at bf16 compute."""
    import jax
    from flax import nnx

    from kt_jax.data.batch import Task
    from kt_jax.model.llama import Llama, LlamaConfig
    from kt_jax.train.config import DPOConfig, OptimConfig
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step

    cfg = LlamaConfig(**size["model"], dtype="bfloat16", param_dtype="float32", attention="auto")
    peak = bf16_peak(jax.devices()[0])
    out = []
    for task, rows in ((Task.SFT, size["rows"]), (Task.DPO, max(size["rows"] // 2, 1))):
        model = Llama(cfg, nnx.Rngs(0))
        tx = make_optimizer(OptimConfig(learning_rate=1e-5), total_steps=100)
        ts = create_state(model, tx)
        loss_fn = make_dpo_loss(DPOConfig()) if task.preference else make_sft_loss()
        step = make_train_step(ts, tx, loss_fn)
        micro = jax.device_put(_train_batch(task, rows, size["length"]), jax.devices()[0])
        compiled = step.lower(ts.params, ts.opt_state, ts.frozen, micro).compile()
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        params, opt, times = ts.params, ts.opt_state, []
        for i in range(size["steps"] + 1):
            t0 = time.perf_counter()
            params, opt, metrics = step(params, opt, ts.frozen, micro)
            loss = float(metrics["loss"])  # waits for the step
            if i:  # the first call includes dispatch warm-up
                times.append(time.perf_counter() - t0)
        sec = float(np.median(times))
        tokens = rows * size["length"] * (2 if task.preference else 1)
        mfu = f"{100 * flops / sec / peak:.1f}%" if peak else "n/a (no bf16 peak for this device)"
        out.append([f"{task.name.lower()} step ({model.config.num_params() / 1e6:.0f} M params, full, bf16)",
                    f"{tokens} tok, {sec * 1e3:.0f} ms, {flops / sec / 1e9:.0f} GFLOP/s", f"MFU {mfu}",
                    "ok" if np.isfinite(loss) else "FAIL"])
        del params, opt, ts, model
    return out


def check_scoring(size: dict[str, Any], workdir: Path) -> list[list[Any]]:
    """Per-fact summed log-probs: kt-jax prefix-shared scoring vs HF transformers (torch) on the same weights."""
    import common
    import jax.numpy as jnp
    import torch
    import transformers

    from kt_jax.inference.scoring import score_encoded
    from kt_jax.model.hf import load_pretrained

    path = common.make_hf_llama(workdir / "hf", **size["hf"])
    rng = np.random.default_rng(1)
    vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
    pairs = []
    for i in range(size["pairs"]):
        prompt = rng.integers(3, vocab, 12 + (i // 4) % 9).tolist()
        for j in range(4):  # four facts per question, as prefix-shared scoring packs them
            pairs.append((prompt, rng.integers(3, vocab, 3 + (i + j) % 11).tolist()))
    ours = np.array([s for s, _ in score_encoded(load_pretrained(path, dtype=jnp.float32), pairs, max_len=128)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ref = []
    with torch.no_grad():
        for prompt, resp in pairs:
            ids = torch.tensor([prompt + resp], device=device)
            logp = torch.log_softmax(hf(ids).logits.double(), -1)[0]
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(resp) - 1, device=device)
            ref.append(float(logp[pos, ids[0, pos + 1]].sum()))
    err = float(np.max(np.abs(ours - np.array(ref))))
    return [[f"scoring vs HF torch ({device})", f"{len(pairs)} facts, float32", f"{err:.2e}",
             "ok" if err <= 1e-3 else "FAIL"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (for the test)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import jax

    size = SIZES["smoke" if args.smoke else "full"]
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; jax {jax.__version__}; "
          f"bf16 peak {bf16_peak(dev) or 'unknown'}")
    rows: list[list[Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("attention", lambda: check_attention(size)), ("train", lambda: check_train(size)),
                         ("scoring", lambda: check_scoring(size, Path(tmp)))):
            t0 = time.perf_counter()
            got = fn()
            rows += [[*r, f"{time.perf_counter() - t0:.0f} s" if i == 0 else ""] for i, r in enumerate(got)]
            print(f"  {name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    headers = ["check", "setting", "result", "status", "took"]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(headers, r, strict=True)) for r in rows], indent=2) + "\n")
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
