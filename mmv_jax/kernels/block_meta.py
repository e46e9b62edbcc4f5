"""Device-side (jax) block metadata shared by the Pallas and Triton kernels: per-block segment
ranges and, from their overlap, each q-block's span of k-blocks and each k-block's span of
q-blocks. Equal to the numpy bookkeeping in ``kernels/blocks.py`` (tested)."""
from __future__ import annotations

import jax.numpy as jnp

_EMPTY_MIN = jnp.iinfo(jnp.int32).max
_EMPTY_MAX = -1


def block_segment_ranges(segment_ids, block: int):
    """[B, S] -> per-block (min, max) non-zero segment id, [B, S // block] int32 each; an
    all-padding block gets the empty range (int32 max, -1)."""
    b, s = segment_ids.shape
    seg = segment_ids.astype(jnp.int32).reshape(b, s // block, block)
    valid = seg != 0
    return (jnp.where(valid, seg, _EMPTY_MIN).min(axis=-1),
            jnp.where(valid, seg, _EMPTY_MAX).max(axis=-1))


def block_overlap_mask(segment_ids, block_q: int, block_k: int):
    """[B, nq, nk] bool: the (q-block, k-block) pairs a kernel computes."""
    qlo, qhi = block_segment_ranges(segment_ids, block_q)
    klo, khi = block_segment_ranges(segment_ids, block_k)
    return (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])


def _spans(mask):
    """First/last True along the last axis of [B, n, m]; (0, -1) where none."""
    m = mask.shape[-1]
    anyt = mask.any(axis=-1)
    first = jnp.argmax(mask, axis=-1)
    last = m - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
    return (jnp.where(anyt, first, 0).astype(jnp.int32),
            jnp.where(anyt, last, -1).astype(jnp.int32))


def block_metadata(segment_ids, block_q: int, block_k: int):
    """(qlo, qhi, klo, khi, kstart, kend, qstart, qend), each flattened 1-D int32."""
    qlo, qhi = block_segment_ranges(segment_ids, block_q)
    klo, khi = block_segment_ranges(segment_ids, block_k)
    mask = (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
    kstart, kend = _spans(mask)                      # per q-block span of k-blocks
    qstart, qend = _spans(jnp.swapaxes(mask, 1, 2))  # per k-block span of q-blocks
    return tuple(x.reshape(-1).astype(jnp.int32)
                 for x in (qlo, qhi, klo, khi, kstart, kend, qstart, qend))
