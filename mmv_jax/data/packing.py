"""Packer (numpy only): all views of a batch -> one :class:`~mmv_jax.batch.PackedBatch` whose
shape comes from a small fixed set of buckets ``(rows, seq_len, slots)``.

Views are assigned to rows by first-fit decreasing (a view never straddles two rows); the
batch takes the smallest configured row count that holds them. With several processes the row
count is agreed across them first (the largest need), so every process feeds the same shape. Buckets share one ``seq_len``
(a multiple of 128, the attention kernels' block size). :func:`auto_bucket_rows` picks the row
counts from the view-size distribution (Monte Carlo over the view sampler on nominal image
shapes) so that the expected padding is minimal with at most ``max_shapes`` shapes.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mmv_jax.batch import PATCH, PackedBatch, View, empty_batch, pack_rows


class BucketError(ValueError):
    """A batch that fits no configured bucket (a configuration error)."""


def ffd_rows(sizes: Sequence[int], seq_len: int, slots: int) -> list[list[int]]:
    """First-fit decreasing (same result as :func:`mmv_jax.batch.first_fit_rows`, vectorised
    row search). Returns the item indices of each row."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.size and sizes.max() > seq_len:
        raise BucketError(f"a view of {int(sizes.max())} tokens exceeds the row length {seq_len}")
    order = np.argsort(-sizes, kind="stable")
    cap = len(sizes) + 1
    free = np.full(cap, seq_len, np.int64)
    count = np.zeros(cap, np.int64)
    rows: list[list[int]] = []
    n_rows = 0
    for i in order:
        s = sizes[i]
        ok = (free[:n_rows] >= s) & (count[:n_rows] < slots)
        r = int(np.argmax(ok)) if n_rows and ok.any() else n_rows
        if r == n_rows:
            rows.append([])
            n_rows += 1
        rows[r].append(int(i))
        free[r] -= s
        count[r] += 1
    return rows


def pack_compact(views: Sequence[View], seq_len: int, slots: int, patch_dim: int
                 ) -> tuple[PackedBatch, dict]:
    """Packs ``views`` into as few rows as first-fit decreasing needs (no bucket padding yet).

    Returns ``(batch, info)`` with ``info`` = ``real_tokens`` and ``rows_needed`` (numpy scalars).
    The bucket is chosen later (:func:`bucket_for`, :func:`pad_rows`): with several processes
    every process must use the same row count, which only the consumer can agree on.
    """
    sizes = [v.num_tokens for v in views]
    assign = ffd_rows(sizes, seq_len, slots)
    batch = pack_rows([[views[i] for i in row] for row in assign], seq_len, slots, patch_dim)
    return batch, dict(real_tokens=np.int64(sum(sizes)), rows_needed=np.int64(len(assign)))


def bucket_for(rows_needed: int, row_buckets: Sequence[int]) -> int:
    """The smallest of ``row_buckets`` that holds ``rows_needed`` rows; :class:`BucketError` if
    none does."""
    fits = [r for r in sorted(row_buckets) if r >= rows_needed]
    if not fits:
        raise BucketError(
            f"a batch needs {rows_needed} rows but the largest bucket has {max(row_buckets)} "
            f"rows; raise data.buckets.rows (or seq_len), or set data.buckets.rows=() to size "
            f"them automatically from data.buckets.nominal_*_shape")
    return fits[0]


def pad_rows(batch: PackedBatch, rows: int) -> PackedBatch:
    """Appends empty rows (padding tokens, empty view slots) up to ``rows``."""
    extra = rows - batch.segment_ids.shape[0]
    if extra < 0:
        raise ValueError(f"batch has {batch.segment_ids.shape[0]} rows, more than {rows}")
    if extra == 0:
        return batch
    empty = empty_batch(extra, batch.segment_ids.shape[1], batch.view_sample.shape[1],
                        batch.patches.shape[2])
    return PackedBatch(*(np.concatenate([x, e.astype(x.dtype)]) for x, e in zip(batch, empty)))


def pack_into(views: Sequence[View], rows: int, seq_len: int, slots: int, patch_dim: int
              ) -> PackedBatch:
    """Packs ``views`` into exactly ``rows`` rows (first-fit decreasing, then empty rows); raises
    ``ValueError`` when they need more. Evaluation batches, whose shape is fixed in advance."""
    batch, _ = pack_compact(views, seq_len, slots, patch_dim)
    return pad_rows(batch, rows)


def pack_batch(views: Sequence[View], row_buckets: Sequence[int], seq_len: int, slots: int,
               patch_dim: int) -> tuple[PackedBatch, dict]:
    """Packs ``views`` into the smallest bucket of ``row_buckets`` rows that holds them (one
    process: :func:`pack_compact`, :func:`bucket_for`, :func:`pad_rows`).

    Returns ``(batch, info)`` with ``info`` = ``packing_efficiency`` (real tokens / capacity),
    ``real_tokens``, ``rows``, ``rows_needed``. Raises :class:`BucketError` when even the largest
    bucket is too small.
    """
    batch, info = pack_compact(views, seq_len, slots, patch_dim)
    rows = bucket_for(int(info["rows_needed"]), row_buckets)
    real = int(info["real_tokens"])
    info.update(packing_efficiency=np.float32(real / (rows * seq_len)), rows=np.int64(rows))
    return pad_rows(batch, rows), info


def rows_needed(sizes: Sequence[int], seq_len: int, slots: int) -> int:
    return len(ffd_rows(sizes, seq_len, slots))


def choose_rows(needed: Sequence[int], max_shapes: int, multiple_of: int = 1,
                margin_sigma: float = 6.0) -> tuple[int, ...]:
    """Row counts (at most ``max_shapes``, multiples of ``multiple_of``) minimising the expected
    padding rows for the sampled ``needed`` distribution; the largest covers the sample maximum
    and ``mean + margin_sigma * std`` (+1 row), so real batches practically always fit."""
    needed = np.asarray(needed, np.int64)
    m = max(1, int(multiple_of))
    up = lambda x: int(math.ceil(x / m) * m)
    top = up(max(needed.max(), needed.mean() + margin_sigma * needed.std()) + 1)
    cands = sorted({up(v) for v in needed} | {top})
    cands = [c for c in cands if c <= top]
    k = min(max_shapes, len(cands))
    # DP over sorted candidates: cost of covering needed values with chosen thresholds.
    vals, counts = np.unique(needed, return_counts=True)

    def cost(lo_excl, hi):  # padding for needed values in (lo_excl, hi] served by hi
        sel = (vals > lo_excl) & (vals <= hi)
        return float(((hi - vals[sel]) * counts[sel]).sum())

    n = len(cands)
    INF = float("inf")
    # best[j][c]: min cost with c thresholds, the largest being cands[j], covering vals <= cands[j]
    best = [[INF] * (k + 1) for _ in range(n)]
    prev = [[-1] * (k + 1) for _ in range(n)]
    for j in range(n):
        best[j][1] = cost(-1, cands[j])
        for c in range(2, k + 1):
            for i in range(j):
                v = best[i][c - 1] + cost(cands[i], cands[j])
                if v < best[j][c]:
                    best[j][c], prev[j][c] = v, i
    j = n - 1
    c = min(range(1, k + 1), key=lambda c: best[j][c])
    out = []
    while j >= 0 and c >= 1:
        out.append(cands[j])
        j, c = prev[j][c], c - 1
    return tuple(sorted(out))


def auto_bucket_rows(shapes_counts: Sequence[tuple[tuple[int, int, int], int]], *, seq_len: int,
                     slots: int, max_shapes: int, multiple_of: int, view_kwargs: dict,
                     n_batches: int = 48, seed: int = 0) -> tuple[int, ...]:
    """Samples ``n_batches`` batches of view sizes for ``shapes_counts`` = ``[(nominal [Z, H, W],
    samples per batch), ...]`` and returns :func:`choose_rows` of the rows each needs."""
    from mmv_jax.data.views import view_tokens
    rng = np.random.default_rng([seed, 7919])
    needed = []
    for _ in range(n_batches):
        sizes = []
        for shape, count in shapes_counts:
            for _ in range(count):
                sizes += view_tokens(rng, shape, **view_kwargs)
        needed.append(rows_needed(sizes, seq_len, slots))
    return choose_rows(needed, max_shapes, multiple_of)


def patch_dim_for(has_3d: bool, p: int = PATCH) -> int:
    """``P**3`` when a batch may hold 3D views, else ``P*P`` (2D depth slice only)."""
    return p ** 3 if has_3d else p * p
