"""kt_jax.distributed: where the multi-process settings come from, their validation, the process-0 rule.

The real 2-process start-up is exercised in tests/test_multihost.py (its worker calls initialize_from_env).
"""

from __future__ import annotations

import logging

import jax
import pytest

from kt_jax.distributed import (
    DistributedSpec,
    initialize_from_env,
    is_main_process,
    main_process_only,
    process_summary,
    setup_logging,
    spec_from_env,
    sync,
)
from kt_jax.errors import ConfigError

ENV = {"KT_JAX_COORDINATOR": "10.0.0.2:8476", "KT_JAX_NUM_PROCESSES": "4", "KT_JAX_PROCESS_ID": "3"}


def test_nothing_set_is_a_single_process_run() -> None:
    assert spec_from_env(env={}) is None
    assert spec_from_env(env={"KT_JAX_DISTRIBUTED": "0"}) is None
    assert initialize_from_env(env={}) is False  # and initialises nothing


def test_environment_and_arguments() -> None:
    spec = spec_from_env(env=ENV)
    assert spec == DistributedSpec("10.0.0.2:8476", 4, 3)
    assert spec.kwargs() == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
    # explicit arguments win over the environment
    assert spec_from_env("127.0.0.1:1234", 2, 0, env=ENV) == DistributedSpec("127.0.0.1:1234", 2, 0)


def test_auto_lets_jax_detect_the_cluster() -> None:
    spec = spec_from_env(env={"KT_JAX_DISTRIBUTED": "auto"})
    assert spec is not None and spec.auto and spec.kwargs() == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KT_JAX_COORDINATOR": "10.0.0.2:8476"}, "KT_JAX_NUM_PROCESSES, KT_JAX_PROCESS_ID missing"),
        ({**ENV, "KT_JAX_COORDINATOR": "10.0.0.2"}, r"KT_JAX_COORDINATOR='10.0.0.2': expected host:port"),
        ({**ENV, "KT_JAX_PROCESS_ID": "4"}, r"KT_JAX_PROCESS_ID=4: must be in \[0, 4\)"),
        ({**ENV, "KT_JAX_NUM_PROCESSES": "two"}, "KT_JAX_NUM_PROCESSES='two' is not an integer"),
        ({**ENV, "KT_JAX_NUM_PROCESSES": "0", "KT_JAX_PROCESS_ID": "0"}, "KT_JAX_NUM_PROCESSES=0: must be >= 1"),
        ({"KT_JAX_DISTRIBUTED": "maybe"}, "KT_JAX_DISTRIBUTED='maybe': expected auto"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec_from_env(env=env)


def test_missing_argument_is_named() -> None:
    with pytest.raises(ConfigError, match="process_id missing"):
        spec_from_env("127.0.0.1:1234", 2, env={})


def test_process_zero_rule_in_a_single_process() -> None:
    calls = []

    @main_process_only
    def write(x: int) -> int:
        calls.append(x)
        return x + 1

    assert is_main_process() and write(1) == 2 and calls == [1]
    sync("noop")  # one process: returns at once
    assert process_summary() == {"process_index": 0, "process_count": 1, "local_devices": jax.local_device_count(),
                                 "global_devices": jax.device_count()}


def test_setup_logging_keeps_info_on_process_zero() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging(logging.INFO)
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
