"""Block-level segment bookkeeping for the segment-masked attention kernels (numpy only).

Packed rows hold contiguous segments (each non-zero segment id is one contiguous run; 0 is
padding). A kernel tiles the row into query blocks of `block_q` tokens and key blocks of
`block_k` tokens. Each block has a *segment range*: the smallest and largest non-zero segment
id it holds (an all-padding block has an empty range). A (q-block, k-block) pair whose ranges do
not overlap is fully masked and the kernels skip it, so their cost follows the sum of squared
segment lengths rather than S^2.

Range overlap is a conservative test: it never skips a pair that shares a segment id. When the
ids of a row increase along the row (what the packer emits), it is exact: a pair's ranges
overlap iff the two blocks share a segment id.

Both kernels compute the same ranges on device (`kernels/block_meta.py`); tests check they agree
with this module.
"""
from __future__ import annotations

import numpy as np

# Sentinels of an empty (all-padding) block range: min > any id, max < any id.
EMPTY_MIN = np.iinfo(np.int32).max
EMPTY_MAX = -1


def _check_row(segment_ids_row, block: int) -> np.ndarray:
  row = np.asarray(segment_ids_row)
  if row.ndim != 1:
    raise ValueError(f"segment_ids_row must be 1-D, got shape {row.shape}")
  if block <= 0 or row.shape[0] % block:
    raise ValueError(
        f"row length {row.shape[0]} must be a positive multiple of the block size {block}")
  return row.astype(np.int64)


def block_ranges(segment_ids_row, block: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-block (min, max) non-zero segment id of a row; empty blocks get (EMPTY_MIN, EMPTY_MAX)."""
  row = _check_row(segment_ids_row, block).reshape(-1, block)
  valid = row != 0
  lo = np.where(valid, row, EMPTY_MIN).min(axis=1)
  hi = np.where(valid, row, EMPTY_MAX).max(axis=1)
  return lo.astype(np.int64), hi.astype(np.int64)


def block_overlap(segment_ids_row, block_q: int, block_k: int) -> np.ndarray:
  """Bool [nq, nk]: True where the (q-block, k-block) segment ranges overlap (pair is computed)."""
  qlo, qhi = block_ranges(segment_ids_row, block_q)
  klo, khi = block_ranges(segment_ids_row, block_k)
  return (qlo[:, None] <= khi[None, :]) & (klo[None, :] <= qhi[:, None])


def block_counts(segment_ids, block_q: int, block_k: int) -> tuple[int, int]:
  """(computed pairs, total pairs) summed over the rows of `segment_ids` ([S] or [R, S])."""
  seg = np.asarray(segment_ids)
  rows = seg.reshape(1, -1) if seg.ndim == 1 else seg.reshape(-1, seg.shape[-1])
  computed = total = 0
  for row in rows:
    m = block_overlap(row, block_q, block_k)
    computed += int(m.sum())
    total += m.size
  return computed, total


def skipped_fraction(segment_ids, block_q: int, block_k: int) -> float:
  """Fraction of (q-block, k-block) pairs the kernels skip, over all rows of `segment_ids`."""
  computed, total = block_counts(segment_ids, block_q, block_k)
  return 1.0 - computed / total if total else 0.0


def useful_flops_fraction(segment_ids) -> float:
  """sum over segments of len^2 / S^2 (token pairs that attend), averaged over rows."""
  seg = np.asarray(segment_ids)
  rows = seg.reshape(1, -1) if seg.ndim == 1 else seg.reshape(-1, seg.shape[-1])
  fr = []
  for row in rows:
    ids, counts = np.unique(row[row != 0], return_counts=True)
    fr.append(float((counts.astype(np.float64) ** 2).sum()) / float(row.shape[0]) ** 2)
  return float(np.mean(fr)) if fr else 0.0


def kv_block_spans(segment_ids_row, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per q-block first and last overlapping k-block (start > end when none)."""
  m = block_overlap(segment_ids_row, block_q, block_k)
  anyk = m.any(axis=1)
  start = np.where(anyk, m.argmax(axis=1), 0)
  end = np.where(anyk, m.shape[1] - 1 - m[:, ::-1].argmax(axis=1), -1)
  return start, end


def check_qkv(kernel: str, q, k, v, segment_ids, dtypes) -> tuple[int, int, int]:
    """The checks every kernel shares; raises ``ValueError`` naming ``kernel`` and the
    constraint. Returns ``(B, S, D)``."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{kernel}: q, k, v must share one [B, S, H, D] shape, got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    b, s, _, d = q.shape
    if segment_ids.shape != (b, s):
        raise ValueError(f"{kernel}: segment_ids must be [B, S] = {(b, s)}, got {segment_ids.shape}")
    if not np.issubdtype(np.dtype(segment_ids.dtype), np.integer):
        raise ValueError(f"{kernel}: segment_ids must be integer, got {segment_ids.dtype}")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        names = [np.dtype(t).name for t in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise ValueError(f"{kernel}: q, k, v must all be {names}, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    return b, s, d

