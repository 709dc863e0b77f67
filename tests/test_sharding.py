"""Mesh construction and the logical-axis rules table."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from kt_jax.errors import ShardingError
from kt_jax.sharding import ShardingRules, batch_axis_size, logical_sharding, make_mesh, shard_batch


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


def test_shard_batch_splits_rows(mesh) -> None:
    x = np.arange(8 * 3).reshape(8, 3)
    arr = shard_batch({"x": x}, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(arr), x)
    n = batch_axis_size(mesh)
    assert {s.data.shape[0] for s in arr.addressable_shards} == {8 // n}
    assert len(jax.devices()) == 8
