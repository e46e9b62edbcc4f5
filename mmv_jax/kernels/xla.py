"""XLA reference for segment-masked attention, with static block skipping.

Dense masked attention over a packed row of S tokens spends S^2 work where only the sum of
squared segment lengths is useful. When the caller bounds every segment's length by
``max_segment_len`` (the packer guarantees it: a view never exceeds the largest view of its
modality), a query block ``[i b, (i + 1) b)`` can only see keys in
``[i b - (L - 1), (i + 1) b + (L - 1))``: key blocks ``i - m .. i + m`` with ``m = ceil((L-1)/b)``.
So the reference computes, per query block, logits against a static band of ``(2 m + 1) b`` keys
only. A segment longer than the bound would be silently truncated; instead the output of its
row is poisoned with NaN (loud: the train step's non-finite check reports it).

Without ``max_segment_len`` the band is the whole row (plain dense masked attention).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30


def band_geometry(seq_len: int, max_segment_len: int | None, block: int) -> tuple[int, int, int]:
    """``(block, halo_blocks, padded_len)`` for the banded computation."""
    if max_segment_len is None or max_segment_len >= seq_len:
        return seq_len, 0, seq_len
    b = min(block, seq_len)
    m = math.ceil((max_segment_len - 1) / b) if max_segment_len > 1 else 0
    padded = math.ceil(seq_len / b) * b
    if (2 * m + 1) * b >= padded:  # the band would cover the row anyway
        return seq_len, 0, seq_len
    return b, m, padded


def _windows(x, m: int, b: int, fill):
    """``x [B, S, ...]`` (S = nq * b) -> ``[B, nq, (2m+1) b, ...]``: key blocks i-m .. i+m."""
    if m == 0:
        return x.reshape(x.shape[0], -1, b, *x.shape[2:])
    pad = [(0, 0)] * x.ndim
    pad[1] = (m * b, m * b)
    xp = jnp.pad(x, pad, constant_values=fill)
    nq = x.shape[1] // b
    xb = xp.reshape(x.shape[0], nq + 2 * m, b, *x.shape[2:])
    w = jnp.stack([xb[:, o:o + nq] for o in range(2 * m + 1)], axis=2)
    return w.reshape(x.shape[0], nq, (2 * m + 1) * b, *x.shape[2:])


def segment_attention_xla(q, k, v, segment_ids, *, max_segment_len: int | None = None,
                          block: int = 64):
    """``softmax(q k^T / sqrt(D) + mask) v`` restricted to equal non-zero segment ids.

    q, k, v ``[B, S, H, D]``; segment_ids ``[B, S]``. Padding queries return 0, never NaN,
    in forward and backward. Softmax in fp32.
    """
    bsz, s, h, d = q.shape
    b, m, padded = band_geometry(s, max_segment_len, block)
    seg = segment_ids.astype(jnp.int32)
    if padded != s:
        extra = [(0, 0), (0, padded - s), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(t, extra) for t in (q, k, v))
        seg = jnp.pad(seg, [(0, 0), (0, padded - s)])
    nq = padded // b
    qb = q.reshape(bsz, nq, b, h, d)
    kw, vw = _windows(k, m, b, 0), _windows(v, m, b, 0)
    seg_q = seg.reshape(bsz, nq, b)
    seg_k = _windows(seg, m, b, -1)
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kw, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(d))
    mask = (seg_q[:, :, :, None] == seg_k[:, :, None, :]) & (seg_q[:, :, :, None] > 0)
    mask = mask[:, :, None]  # [B, nq, 1, b, W]
    logits = jnp.where(mask, logits, NEG)
    probs = jax.nn.softmax(logits, axis=-1) * mask
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs.astype(v.dtype), vw,
                     preferred_element_type=jnp.float32)
    out = out.reshape(bsz, padded, h, d)[:, :s].astype(q.dtype)
    if m:
        lengths = jax.vmap(lambda r: jnp.bincount(r, length=padded + 1))(seg)[:, 1:]
        ok = jnp.max(lengths, axis=1) <= max_segment_len
        out = jnp.where(ok[:, None, None, None], out, jnp.nan)
    return out
