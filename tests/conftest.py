"""Test setup: 8 emulated CPU devices (before JAX initialises) and shared tiny checkpoints."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import pytest

# Newer JAX: the config option is the supported way; XLA_FLAGS above covers older ones.
with contextlib.suppress(Exception):
    jax.config.update("jax_num_cpu_devices", 8)

from helpers.hf_fixtures import LLAMA2_TINY, LLAMA3_TINY, make_hf_llama

from kt_jax.sharding import make_mesh

MESH_SHAPES = {"1": (1, 1, 1), "2x4": (2, 1, 4), "8x1": (1, 8, 1)}


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory: pytest.TempPathFactory):
    """Llama-2 style: MHA, untied embeddings, default RoPE."""
    return make_hf_llama(tmp_path_factory.mktemp("llama2"), seed=1, **LLAMA2_TINY)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory):
    """Llama-3 style: GQA, tied embeddings, llama3 RoPE scaling, theta 5e5."""
    return make_hf_llama(tmp_path_factory.mktemp("llama3"), seed=2, **LLAMA3_TINY)


@pytest.fixture(params=sorted(MESH_SHAPES), ids=lambda k: f"mesh{k}")
def mesh(request: pytest.FixtureRequest):
    """The three mesh shapes every sharded feature is tested on: 1 device, data=2 x tensor=4, fsdp=8."""
    data, fsdp, tensor = MESH_SHAPES[request.param]
    return make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
