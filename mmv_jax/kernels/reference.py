"""The definition of segment-masked attention (docs/architecture.md, ``segment_attention``):
dense, S^2 logits, plain einsum. Every kernel is tested against it; it is too slow to train with."""

from __future__ import annotations

import math

import jax.numpy as jnp


def segment_attention_reference(q, k, v, segment_ids):
    """``softmax(q k^T / sqrt(D)) v`` over the keys of each query's own non-zero segment.

    q, k, v ``[B, S, H, D]``; segment_ids ``[B, S]``, 0 = padding. Padding query rows are zero,
    with zero gradients. Matmuls in the input dtype with fp32 accumulation, softmax in fp32,
    output in q's dtype.
    """
    seg = segment_ids[:, :, None]
    mask = ((seg == segment_ids[:, None, :]) & (seg != 0))[:, None]  # [B, 1, Sq, Sk]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    # A finite fill: a padding row's max is then finite too, and exp never sees inf - inf.
    s = jnp.where(mask, s / math.sqrt(q.shape[-1]), -1e30)
    p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # padding rows: 0 / 1, finite in forward mode too
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def outputs_and_grads(fn, q, k, v, segment_ids, *, reference: bool = False):
    """``[out, dq, dk, dv]`` of ``fn(q, k, v, segment_ids)``, jitted: what a kernel check compares.

    The gradients are of a fixed, non-uniform weighting of the output (a plain sum would leave dq
    zero: softmax rows sum to one). ``reference=True`` runs ``fn`` on fp32 copies of q, k, v at
    the highest matmul precision, the setting a kernel in any dtype is compared against.
    """
    import jax

    if reference:
        fn_in = fn
        fn = lambda q, k, v, s: fn_in(*(x.astype(jnp.float32) for x in (q, k, v)), s)
    w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids).astype(jnp.float32) * w)
    with jax.default_matmul_precision("highest" if reference else None):
        return [jax.jit(fn)(q, k, v, segment_ids), *jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)]
