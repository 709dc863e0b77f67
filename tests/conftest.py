"""Test setup: 8 emulated CPU devices (before JAX initialises) and shared tiny checkpoints."""

from __future__ import annotations

import contextlib
import importlib.util
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

# HF PyTorch references need torch (and peft, BERTScore on top), installed only for Python 3.11 here: the Python 3.12
# CI run goes without them. A test that stops only because one of these is not installed is a skip, not a failure.
TORCH_ONLY = tuple(m for m in ("torch", "peft", "bert_score") if importlib.util.find_spec(m) is None)


def _missing_module(exc: BaseException | None) -> str | None:
    """The name of a TORCH_ONLY module whose absence raised `exc` (or anything in its chain), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TORCH_ONLY:
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Report a test (or its fixture) that needs an absent TORCH_ONLY module as skipped."""
    outcome = yield
    name = _missing_module(call.excinfo.value) if TORCH_ONLY and call.excinfo is not None else None
    if name is not None:
        report = outcome.get_result()
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {name}, not installed here")


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory: pytest.TempPathFactory):
    """Llama-2 style: MHA, untied embeddings, default RoPE."""
    pytest.importorskip("torch")
    return make_hf_llama(tmp_path_factory.mktemp("llama2"), seed=1, **LLAMA2_TINY)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory):
    """Llama-3 style: GQA, tied embeddings, llama3 RoPE scaling, theta 5e5."""
    pytest.importorskip("torch")
    return make_hf_llama(tmp_path_factory.mktemp("llama3"), seed=2, **LLAMA3_TINY)


@pytest.fixture(params=sorted(MESH_SHAPES), ids=lambda k: f"mesh{k}")
def mesh(request: pytest.FixtureRequest):
    """The three mesh shapes every sharded feature is tested on: 1 device, data=2 x tensor=4, fsdp=8."""
    data, fsdp, tensor = MESH_SHAPES[request.param]
    return make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
