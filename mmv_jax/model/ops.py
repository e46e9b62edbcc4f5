"""The encoder's dense math — matmul and LayerNorm — chosen per platform.

:func:`for_platform` picks the implementation by the same platform resolution as attention
(``kernels.attention.resolve_platform``: the mesh the step is traced for, else the default
backend), so a step compiled for a TPU topology on a CPU host gets the TPU math.

- GPU and TPU (every platform but CPU): the plain formulas below, differentiated by JAX's own
  autodiff, so forward mode (``jax.jvp``) works and XLA sees ordinary dots and reductions.
- CPU: :mod:`mmv_jax.model.cpu_ops`, the same values with hand-written backward passes that
  XLA:CPU runs much faster (see that module for why).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from mmv_jax.kernels.attention import resolve_platform
from mmv_jax.model import cpu_ops
from mmv_jax.model.axes import current_mesh


def matmul(x, w):
    """``x [..., din] @ w [din, ...]``."""
    return jnp.tensordot(x, w, axes=1)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis, computed in fp32, returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


PLAIN = types.SimpleNamespace(matmul=matmul, layer_norm=layer_norm)


def for_platform(platform: str | None = None) -> types.SimpleNamespace:
    """The ops for ``platform`` (default: resolved from the mesh in context, as attention does)."""
    if (platform or resolve_platform(current_mesh())) != "cpu":
        return PLAIN
    return cpu_ops.OPS
