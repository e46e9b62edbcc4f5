"""XLA:CPU-friendly matmul and LayerNorm: the values of :mod:`mmv_jax.model.ops`' plain
formulas, with backward passes written by hand. Only :func:`mmv_jax.model.ops.for_platform`
hands these out, and only for CPU: the custom VJPs rule out forward-mode autodiff and would
only get in the way of the GPU and TPU compilers.

Why each piece exists (figures: README, "CPU benchmarks"):
- ``matmul`` flattens the leading dims so the weight gradient is one canonical 2D matmul
  (XLA:CPU runs dots with two contracting dims slowly), and its input gradient multiplies by a
  materialised transpose of the weight, which XLA:CPU runs faster than a dot with the
  transpose folded in. The copy is weight-sized.
- ``layer_norm`` saves only ``x`` and two per-token statistics and keeps every reduction a
  contraction (``_rowdot``): XLA:CPU runs a fused multiply-reduce over the minor axis far slower
  than the equivalent dot, and autodiff's derivative of the formula is built of those.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp


def matmul(x, w):
    """``x [..., din] @ w [din, ...]`` as one 2D matmul."""
    lead, din = x.shape[:-1], x.shape[-1]
    y = _matmul2d(x.reshape(-1, din), w.reshape(din, -1))
    return y.reshape(*lead, *w.shape[1:])


@jax.custom_vjp
def _matmul2d(x, w):
    return x @ w


def _matmul2d_fwd(x, w):
    return x @ w, (x, w)


def _matmul2d_bwd(res, g):
    x, w = res
    # the barrier keeps XLA from folding the transpose back into the dot
    return g @ jax.lax.optimization_barrier(w.T), x.T @ g


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def _rowdot(a, b):
    """``sum(a * b, -1)`` as a contraction, keeping the reduced axis."""
    return jnp.einsum("...d,...d->...", a, b)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis in fp32, output in ``x.dtype``."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    return ((xf - mean) * rstd * scale + bias).astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    g2, xhat2 = gf.reshape(-1, gf.shape[-1]), xhat.reshape(-1, gf.shape[-1])
    dscale = jnp.einsum("nd,nd->d", g2, xhat2)
    dbias = g2.sum(0)
    gs = gf * scale
    n = gf.shape[-1]
    dx = rstd * (gs - _rowdot(gf, scale) / n - xhat * (_rowdot(gs, xhat) / n))
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)

OPS = types.SimpleNamespace(matmul=matmul, layer_norm=layer_norm)
