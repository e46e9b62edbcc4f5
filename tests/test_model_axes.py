"""Logical-axis rules: logical names map to mesh axes, and a mesh axis shards at most one
dimension of an array (XLA rejects a PartitionSpec that names an axis twice)."""

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mmv_jax.model.axes import axis_rules, constrain, logical_to_spec, shard_map_over

RULES = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
}


def _mesh_axes(spec):
    for entry in spec:
        yield from (() if entry is None else (entry,) if isinstance(entry, str) else entry)


def test_names_map_to_their_mesh_axes():
    assert logical_to_spec(("batch", "seq", "embed"), RULES) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", None, "heads", None), RULES) == P("fsdp", None, "tensor", None)
    assert logical_to_spec(("seq", "vocab"), RULES) == P(None, None)  # unmapped names replicate


def test_a_mesh_axis_shards_one_dimension_at_most():
    # the first dimension that asks for an axis keeps it; later ones keep what is left
    assert logical_to_spec(("heads", "mlp"), RULES) == P("tensor", None)
    assert logical_to_spec(("embed", "batch"), RULES) == P("fsdp", "data")
    names = (*RULES, None)
    for n in range(1, 4):
        for combo in itertools.permutations(names, n):
            spec = logical_to_spec(combo, RULES)
            axes = list(_mesh_axes(spec))
            assert len(axes) == len(set(axes)), (combo, spec)
            for name, entry in zip(combo, spec):  # only axes the rules give that name
                allowed = RULES.get(name) or ()
                allowed = (allowed,) if isinstance(allowed, str) else allowed
                assert set(_mesh_axes((entry,))) <= set(allowed), (combo, spec)


def test_constrain_applies_inside_axis_rules_only():
    x = jnp.ones((4, 8))
    assert constrain(x, ("batch", None)) is x
    fn = lambda x: x + 1
    assert shard_map_over(fn, [("batch", None)], ("batch", None)) is fn
    mesh = jax.make_mesh(
        (1, 1, 1),
        ("data", "fsdp", "tensor"),
        devices=jax.devices()[:1],
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    with axis_rules(mesh, RULES):
        text = jax.jit(lambda x: constrain(x, ("batch", "embed"))).lower(x).as_text()
        assert 'sharding_constraint %arg0 <@mesh, [{"data", "fsdp"}, {}]>' in text  # fsdp once
        assert shard_map_over(fn, [("batch", None)], ("batch", None)) is not fn
    with pytest.raises(RuntimeError), axis_rules(mesh, RULES):
        raise RuntimeError
    assert constrain(x, ("batch", None)) is x  # the context is gone, also after an error
