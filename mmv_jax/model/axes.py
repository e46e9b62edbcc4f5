"""Logical axis names and the one activation-constraint helper.

Model code names logical axes (``batch``, ``seq``, ``embed``, ``heads``, ``mlp``); a rules table
(from the config, applied by ``train/sharding.py``) maps them to mesh axes. Parameters carry
their logical axes as ``nnx.Param(..., logical_axes=(...))`` metadata. Outside
:func:`axis_rules` (single device, tests) :func:`constrain` is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

_CTX: list[tuple[jax.sharding.Mesh, dict]] = []


def logical_to_spec(names: Sequence[str | None], rules: dict) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    used: set = set()
    out = []
    for name in names:
        axes = rules.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(mesh: jax.sharding.Mesh, rules: dict):
    """While tracing inside this context, :func:`constrain` shards activations on ``mesh``."""
    _CTX.append((mesh, dict(rules)))
    try:
        yield
    finally:
        _CTX.pop()


def current_mesh() -> jax.sharding.Mesh | None:
    """The mesh of the innermost :func:`axis_rules` context (None outside one)."""
    return _CTX[-1][0] if _CTX else None


def shard_map_over(fn, in_names, out_names):
    """``fn`` run per device under ``shard_map`` with logically named in/out specs when a mesh
    context is active (kernels that XLA cannot partition); ``fn`` itself otherwise."""
    if not _CTX:
        return fn
    mesh, rules = _CTX[-1]
    in_specs = tuple(logical_to_spec(n, rules) for n in in_names)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=logical_to_spec(out_names, rules),
        check_vma=False,
    )


def constrain(x, names: Sequence[str | None]):
    if not _CTX:
        return x
    mesh, rules = _CTX[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
