"""What the attention impls share: the input checks and the per-block segment metadata.

Packed rows hold contiguous segments (each non-zero segment id one contiguous run; 0 is
padding). A kernel tiles a row into query blocks of ``block_q`` tokens and key blocks of
``block_k`` tokens. Each block has a *segment range*: the smallest and largest non-zero segment
id it holds (an all-padding block has an empty range). A (q-block, k-block) pair whose ranges do
not overlap is fully masked and the kernels skip it, so their cost follows the sum of squared
segment lengths rather than S^2. Range overlap is conservative: it never skips a pair that shares
a segment id, and when the ids of a row increase along it (what the packer emits) it is exact.
Computed on device, in JAX; ``tests/blocks_oracle.py`` checks it against plain numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# An empty (all-padding) block's range: its min is above and its max below every id.
_EMPTY_MIN = jnp.iinfo(jnp.int32).max
_EMPTY_MAX = -1


def check_qkv(kernel: str, q, k, v, segment_ids, dtypes=None) -> tuple[int, int, int]:
    """The checks every impl shares; raises ``ValueError`` naming ``kernel`` and the
    constraint. ``dtypes``: those ``q`` may have (``None``: any one dtype for all three).
    Returns ``(B, S, D)``."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{kernel}: q, k, v must share one [B, S, H, D] shape, got {q.shape}, "
            f"{k.shape}, {v.shape}"
        )
    b, s, _, d = q.shape
    if segment_ids.shape != (b, s):
        raise ValueError(
            f"{kernel}: segment_ids must be [B, S] = {(b, s)}, got {segment_ids.shape}"
        )
    if not np.issubdtype(np.dtype(segment_ids.dtype), np.integer):
        raise ValueError(f"{kernel}: segment_ids must be integer, got {segment_ids.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{kernel}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if dtypes is not None and q.dtype not in dtypes:
        names = [np.dtype(t).name for t in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise ValueError(
            f"{kernel}: q, k, v must all be {names}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    return b, s, d


def block_segment_ranges(segment_ids, block: int):
    """[B, S] -> per-block (min, max) non-zero segment id, [B, S // block] int32 each; an
    all-padding block gets the empty range (int32 max, -1)."""
    b, s = segment_ids.shape
    seg = segment_ids.astype(jnp.int32).reshape(b, s // block, block)
    valid = seg != 0
    return jnp.where(valid, seg, _EMPTY_MIN).min(axis=-1), jnp.where(valid, seg, _EMPTY_MAX).max(
        axis=-1
    )


def _overlap(qlo, qhi, klo, khi):
    return (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])


def block_overlap_mask(segment_ids, block_q: int, block_k: int):
    """[B, nq, nk] bool: the (q-block, k-block) pairs a kernel computes."""
    return _overlap(
        *block_segment_ranges(segment_ids, block_q), *block_segment_ranges(segment_ids, block_k)
    )


def _spans(mask):
    """First/last True along the last axis of [B, n, m]; (0, -1) where none."""
    m = mask.shape[-1]
    anyt = mask.any(axis=-1)
    first = jnp.argmax(mask, axis=-1)
    last = m - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
    return jnp.where(anyt, first, 0).astype(jnp.int32), jnp.where(anyt, last, -1).astype(jnp.int32)


def block_metadata(segment_ids, block_q: int, block_k: int):
    """(qlo, qhi, klo, khi, kstart, kend, qstart, qend), each flattened 1-D int32: the block
    ranges, each q-block's span of overlapping k-blocks and each k-block's span of q-blocks."""
    qlo, qhi = block_segment_ranges(segment_ids, block_q)
    klo, khi = block_segment_ranges(segment_ids, block_k)
    mask = _overlap(qlo, qhi, klo, khi)
    kstart, kend = _spans(mask)
    qstart, qend = _spans(jnp.swapaxes(mask, 1, 2))
    return tuple(
        x.reshape(-1).astype(jnp.int32) for x in (qlo, qhi, klo, khi, kstart, kend, qstart, qend)
    )
