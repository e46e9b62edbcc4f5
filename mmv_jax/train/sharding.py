"""Mesh, logical-axis rules and shardings for params, optimizer state and batches.

Mesh axes are ``("data", "fsdp", "tensor")``. The model names logical axes (``batch``, ``seq``,
``embed``, ``heads``, ``mlp``); ``config.mesh.rules`` maps them to mesh axes (one table). A
parameter dimension that a mesh axis does not divide stays replicated on that axis (logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmv_jax.errors import ConfigError
from mmv_jax.model.axes import logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)
log = logging.getLogger(__name__)


def rules_dict(rules) -> dict:
    return {
        name: (tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules
    }


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one ``-1`` entry; raises naming ``mesh.shape`` when it cannot match the devices."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ConfigError(
            f"config.mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}"
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config.mesh.shape {shape}: positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh.shape {shape} does not divide the {num_devices} devices"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    resolved = mesh_shape(shape, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(resolved, devices=devices)
    except Exception:  # topologies mesh_utils does not know: plain reshape keeps process order
        arr = np.asarray(devices, dtype=object).reshape(resolved)
    return Mesh(arr, MESH_AXES)


def _fit_spec(spec: PartitionSpec, shape, mesh: Mesh, name: str) -> PartitionSpec:
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else axes
            size = math.prod(mesh.shape[a] for a in names)
            if dim % size:
                log.info(
                    "param %s: dim %d not divisible by mesh %s=%d, replicated",
                    name,
                    dim,
                    axes,
                    size,
                )
                axes = None
        out.append(axes)
    return PartitionSpec(*out)


def param_shardings(abstract_state, mesh: Mesh, rules: dict):
    """NamedShardings for an (abstract) ``nnx.State`` from each Param's ``logical_axes``."""

    def one(path, var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        spec = _fit_spec(logical_to_spec(axes, rules), var.shape, mesh, name)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, p_shardings, mesh: Mesh):
    """Optimizer state mirrors the params' shardings; scalars (counts) are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, p_shardings, transform_non_params=lambda _: replicated
    )


def batch_shardings(mesh: Mesh, rules: dict) -> NamedSharding:
    """The sharding of every field of every row group of a batch (a pytree prefix for jit):
    rows split like the logical ``batch`` axis."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def rows_per_process_multiple(mesh: Mesh, rules: dict, process_count: int) -> int:
    """Each process's row count must split evenly over its share of the batch-sharding axes."""
    spec = logical_to_spec(("batch",), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    shards = math.prod(mesh.shape[a] for a in names)
    if shards % process_count:
        raise ConfigError(
            f"config.mesh.shape {tuple(mesh.shape.values())}: the batch axes {names} "
            f"({shards} shards) must be a multiple of the {process_count} processes"
        )
    return shards // process_count


def global_batch(local, sharding: NamedSharding):
    """This process's rows (a PackedBatch or a tuple of row groups, numpy) -> global jax arrays
    (rows concatenated over processes)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def describe(p_shardings) -> str:
    """One line per parameter: path, shape-independent spec (logged at start-up)."""
    lines = []
    for path, s in jax.tree_util.tree_flatten_with_path(p_shardings)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        lines.append(f"  {name}: {s.spec}")
    return "\n".join(lines)
