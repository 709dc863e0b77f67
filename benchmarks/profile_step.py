"""Where a kt-jax SFT train step spends its time on this machine: a jax.profiler trace and a per-op table.

Run: `.venv/bin/python benchmarks/profile_step.py [--layers 4 --hidden 128 --ffn 384 --heads 4 --vocab 2048
      --batch 32 --seq 128] [--out /tmp/kt-profile]` (defaults: the world-tiny base model's shape and batch).

It traces three steps (forward + backward of the SFT loss, as `train.steps` computes it) after a compiling call and
writes the trace under --out (open it with TensorBoard's profile plugin or xprof). When the `xprof` package is
importable (`pip install xprof`, not a kt-jax dependency) it also prints the XLA ops' time per step grouped by kind
(dot fusions, layout copies, elementwise fusions) and the 15 slowest ops with their HLO, which is what
docs/DESIGN.md "Speed" reports. The machine's jax and torch float32 matmul rates are printed first.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("hidden", 128), ("ffn", 384), ("heads", 4), ("vocab", 2048),
                          ("batch", 32), ("seq", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--out", default="/tmp/kt-profile")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from common import machine_load, matmul_peak
    from flax import nnx

    from kt_jax.data.batch import SeqBatch
    from kt_jax.model.llama import Llama, LlamaConfig
    from kt_jax.train.steps import sft_loss

    print(matmul_peak().line())
    print(f"load average {machine_load()}")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads, tie_word_embeddings=True)
    b, t = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, (b, t)).astype(np.int32)
    segments = np.repeat(np.arange(1, 3), t // 2)[None].repeat(b, 0).astype(np.int32)  # two documents per row
    positions = np.concatenate([np.arange(t // 2)] * 2)[None].repeat(b, 0).astype(np.int32)
    batch = jax.tree.map(jnp.asarray, SeqBatch(input_ids=ids, targets=np.roll(ids, -1, 1),
                                               loss_mask=np.ones((b, t), np.float32), positions=positions,
                                               segment_ids=segments))
    graph, params = nnx.split(Llama(cfg, nnx.Rngs(params=0)))
    grad = jax.jit(jax.value_and_grad(lambda p, x: sft_loss(nnx.merge(graph, p), x, chunk_size=t)[0]))
    jax.block_until_ready(grad(params, batch))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params, batch))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    print(f"model {cfg.num_params() / 1e6:.2f}M params, batch {b} x {t}: forward + backward {step * 1e3:.0f} ms "
          f"({b * t / step:.0f} tokens/s)")
    jax.profiler.start_trace(args.out)
    for _ in range(3):
        jax.block_until_ready(grad(params, batch))
    jax.profiler.stop_trace()
    print(f"trace: {args.out}")
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        print("(pip install xprof for the per-op table)")
        return
    path = sorted(glob.glob(f"{args.out}/**/*.xplane.pb", recursive=True))[-1]
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
    events = json.loads(data)["traceEvents"]
    wrappers = ("ThreadpoolListener", "ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool")
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(wrappers):
            per_op[e["name"]] += e["dur"] / 3 / 1000  # ms per step
    kinds: collections.Counter[str] = collections.Counter()
    for name, ms in per_op.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += ms
    total = sum(kinds.values())
    print(f"\nXLA op time per step, summed over threads: {total:.0f} ms")
    print("| op kind | ms/step | share |\n|---|---|---|")
    for kind, ms in kinds.most_common(10):
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    hlo = grad.lower(params, batch).compile().as_text()
    print("\n| slowest ops | ms/step | what (HLO metadata) |\n|---|---|---|")
    for name, ms in per_op.most_common(15):
        m = re.search(r"\n\s*%?" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
        print(f"| {name} | {ms:.1f} | {m.group(1) + ' ' + m.group(2) if m else '?'} |")


if __name__ == "__main__":
    main()
