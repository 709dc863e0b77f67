"""Mesh construction and the logical-axis rules table."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from kt_jax.errors import ShardingError
from kt_jax.sharding import ShardingRules, Throttle, batch_axis_size, logical_sharding, make_mesh, to_device, to_host


def test_make_mesh_shapes() -> None:
    assert dict(make_mesh(2, -1, 4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ShardingError, match="needs 6 devices"):
        make_mesh(2, 3, 1)
    with pytest.raises(ShardingError, match="at most one"):
        make_mesh(-1, -1, 1)


def test_rules_spec_and_errors() -> None:
    rules = ShardingRules()
    assert rules.spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert rules.spec(("batch", "seq")) == PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ShardingError, match="unknown logical axis name 'bogus'"):
        rules.spec(("bogus",))
    with pytest.raises(ShardingError, match="mesh axis 'tensor' used twice"):
        rules.spec(("heads", "mlp"))
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        ShardingRules.from_dict({"mlp": "model"})
    assert ShardingRules.from_dict({"embed": None}).spec(("embed",)) == PartitionSpec(None)


def test_indivisible_dimension_is_replicated() -> None:
    mesh = make_mesh(1, 1, 8)
    assert logical_sharding(("embed", "vocab"), (64, 1001), mesh).spec == PartitionSpec("fsdp", None)
    assert logical_sharding(("embed", "vocab"), (64, 1000), mesh).spec == PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("process_local", [True, False])
def test_to_device_splits_rows(mesh, process_local: bool) -> None:
    x = np.arange(8 * 3).reshape(8, 3)
    arr = to_device({"x": x}, mesh, process_local=process_local)["x"]
    np.testing.assert_array_equal(np.asarray(arr), x)
    n = batch_axis_size(mesh)
    assert {s.data.shape[0] for s in arr.addressable_shards} == {8 // n}
    np.testing.assert_array_equal(to_host(arr), x)


def test_to_device_microbatch_axis_and_errors(mesh) -> None:
    x = np.arange(2 * 8 * 5).reshape(2, 8, 5)
    arr = to_device(x, mesh, batch_dim=1)
    assert arr.shape == (2, 8, 5) and tuple(arr.sharding.spec)[:2] == (None, ("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arr), x)
    assert isinstance(to_device(x, None), jax.Array)
    if batch_axis_size(mesh) > 1:
        with pytest.raises(ShardingError, match="does not split"):
            to_device(np.zeros((3, 4)), mesh)


def test_throttle_bounds_pending_and_keeps_order() -> None:
    fetched: list[int] = []
    throttle = Throttle(3, fetched.append)
    for i in range(5):
        throttle.push(i)
        assert len(throttle) <= 2
    assert fetched == [0, 1, 2]
    throttle.drain()
    assert fetched == [0, 1, 2, 3, 4] and len(throttle) == 0
    with pytest.raises(ShardingError):
        Throttle(0, fetched.append)
    assert len(jax.devices()) == 8
