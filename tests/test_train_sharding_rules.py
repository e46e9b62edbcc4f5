"""The rules table applied to the real model's parameters, and the per-process row multiple, on
abstract meshes (no devices needed): no parameter names a mesh axis twice (XLA rejects such a
spec), a sharded dimension is divisible by its mesh axes (else replicated), fsdp shards every
weight with an embed dimension and tensor the heads when they divide. The sharded numerics
(8 CPU devices against one) are tests/test_train_sharding.py."""

import math

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from mmv_jax.model.encoder import encoder_config
from mmv_jax.model.heads import MultiMedVision
from mmv_jax.train import sharding as shd

RULES = shd.rules_dict(shd.DEFAULT_RULES)


def _specs(variant, mesh):
    model = nnx.eval_shape(
        lambda: MultiMedVision(
            encoder_config(variant, depth=1), proj_hidden=64, proj_dim=16, rngs=nnx.Rngs(0)
        )
    )
    state = nnx.state(model, nnx.Param)
    shardings = shd.param_shardings(state, mesh, RULES)
    key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
    out = {}
    for (path, var), (_, sh) in zip(
        jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[
            0
        ],
        jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )[0],
    ):
        name = "/".join(key(k) for k in path if key(k) != "value")
        out[name] = (var.shape, sh.get_value().spec)
    return out


def _axes(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@pytest.mark.parametrize("variant,heads", [("Ti/14", 3), ("S/14", 6)])
def test_real_parameters_get_valid_specs(variant, heads):
    mesh = AbstractMesh((2, 2, 2), shd.MESH_AXES)
    specs = _specs(variant, mesh)
    assert len(specs) > 10
    for name, (shape, spec) in specs.items():
        used = [a for entry in spec for a in _axes(entry)]
        assert len(used) == len(set(used)) and set(used) <= set(shd.MESH_AXES), (name, spec)
        for dim, entry in zip(shape, spec):
            assert dim % math.prod(mesh.shape[a] for a in _axes(entry)) == 0, (name, shape, spec)
    # qkv [embed, 3, heads, head_dim]: embed on fsdp; heads on tensor only when 2 divides them
    tensor = "tensor" if heads % 2 == 0 else None
    assert specs["encoder/blocks/0/attn/qkv"][1] == P("fsdp", None, tensor, None)
    assert specs["encoder/blocks/0/attn/proj"][1] == P(tensor, None, "fsdp")
    assert specs["encoder/blocks/0/fc1/kernel"][1] == P("fsdp", "tensor")
    assert specs["encoder/blocks/0/fc2/kernel"][1] == P("tensor", "fsdp")
    assert specs["encoder/patch_embed/kernel"][1] == P(None, "fsdp")


def test_a_mesh_axis_that_divides_nothing_replicates():
    mesh = AbstractMesh((1, 5, 1), shd.MESH_AXES)  # fsdp 5 divides no dimension of Ti/14
    specs = _specs("Ti/14", mesh)
    assert not [
        n for n, (_, spec) in specs.items() if "fsdp" in [a for e in spec for a in _axes(e)]
    ]
    assert specs["encoder/blocks/0/fc1/kernel"][1] == P(None, "tensor")  # the rest as before


@pytest.mark.parametrize(
    "rules,procs,want",
    [
        (RULES, 1, 8),
        (RULES, 2, 4),
        (RULES, 8, 1),  # batch over data x fsdp = 8 shards
        ({**RULES, "batch": "data"}, 2, 2),  # batch over data only = 4 shards
        ({**RULES, "batch": None}, 1, 1),  # replicated batch
    ],
)
def test_rows_per_process_multiple(rules, procs, want):
    mesh = AbstractMesh((4, 2, 1), shd.MESH_AXES)
    assert shd.rows_per_process_multiple(mesh, rules, procs) == want


def test_rows_that_cannot_split_over_the_processes_are_refused():
    with pytest.raises(ValueError, match=r"config\.mesh\.shape"):
        shd.rows_per_process_multiple(AbstractMesh((4, 2, 1), shd.MESH_AXES), RULES, 3)
