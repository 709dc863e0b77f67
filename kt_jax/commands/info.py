"""`kt-jax info --model DIR`: load a checkpoint onto a mesh, print its config, size and parameter layout."""

from __future__ import annotations

import argparse
import time

from kt_jax.commands._mesh import add_mesh_arguments, mesh_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("--model", required=True, help="HF Llama directory (config.json + safetensors)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add_mesh_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and print its config and parameter layout."""
    import jax
    from flax import nnx

    from kt_jax.model.hf import load_pretrained

    mesh = mesh_from_args(args)
    assert mesh is not None  # the options are not optional here
    start = time.perf_counter()
    model = load_pretrained(args.model, mesh=mesh, dtype=args.dtype)
    seconds = time.perf_counter() - start
    cfg = model.config
    print(f"model      {args.model}")
    print(f"layers     {cfg.num_layers}  hidden {cfg.hidden_size}  mlp {cfg.intermediate_size}  vocab {cfg.vocab_size}")
    print(f"heads      {cfg.num_heads} (kv {cfg.num_kv_heads}, head_dim {cfg.head_dim})")
    print(f"tied       {cfg.tie_word_embeddings}")
    print(f"rope       theta {cfg.rope_theta:g}  scaling {cfg.rope_scaling_dict}")
    print(f"params     {cfg.num_params() / 1e6:.2f}M  ({cfg.param_dtype}, compute {cfg.dtype})")
    print(f"mesh       {dict(mesh.shape)} over {len(jax.devices())} {jax.devices()[0].platform} device(s)")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "layers" and path[1] != 0:
            continue
        value = var.get_value()
        print(f"  {'/'.join(map(str, path)):42s} {value.shape!s:18s} {value.sharding.spec}")
    print(f"loaded in {seconds:.1f} s")
    return 0
