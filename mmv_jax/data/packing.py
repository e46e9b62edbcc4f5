"""The packer (numpy only; the one place views become rows): views -> a
:class:`~mmv_jax.batch.PackedBatch` whose shape comes from a small fixed set of buckets
``(rows, seq_len, slots)``.

Views are assigned to rows by first-fit decreasing (a view never straddles two rows); the
batch takes the smallest configured row count that holds them. With several processes the row
count is agreed across them first (the largest need), so every process feeds the same shape.
Buckets share one ``seq_len`` (a multiple of 128, the attention kernels' block size).
:func:`choose_rows` picks the row counts from a sample of row needs (``data.config.bucket_rows``
draws it from the view sampler) so that the expected padding is minimal.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mmv_jax.batch import FIELD_DTYPES, PATCH, PackedBatch, View, shape_of, to_wire


class BucketError(ValueError):
    """A batch that fits no configured bucket (a configuration error)."""


def empty_batch(rows: int, seq_len: int, slots: int, patch_dim: int, dtype=np.float32) -> PackedBatch:
    shapes = shape_of(rows, seq_len, slots, patch_dim)
    dtypes = dict(FIELD_DTYPES, patches=dtype)
    fill = dict(view_sample=-1, view_index=-1)
    return PackedBatch(**{f: np.full(shapes[f], fill.get(f, 0), dtypes[f]) for f in PackedBatch._fields})


def pack_rows(rows: Sequence[Sequence[View]], seq_len: int, slots: int,
              patch_dim: int | None = None, dtype=np.float32) -> PackedBatch:
    """Writes views already assigned to rows (``rows[r]`` = the views of row ``r``, in order)
    into one bucket of shape ``[len(rows), seq_len]`` with ``slots`` view slots a row, patches in
    the wire ``dtype`` (:func:`mmv_jax.batch.to_wire`).

    ``patch_dim`` defaults to ``P**3`` unless every view is a 2D view with ``P*P`` entries.
    Raises ``ValueError`` when a row does not fit.
    """
    dtype = np.dtype(dtype)
    if patch_dim is None:
        dims = {v.patches.shape[1] for row in rows for v in row}
        patch_dim = PATCH * PATCH if dims == {PATCH * PATCH} else PATCH ** 3
    batch = empty_batch(len(rows), seq_len, slots, patch_dim, dtype)
    for r, row in enumerate(rows):
        if len(row) > slots:
            raise ValueError(f"row {r} holds {len(row)} views but the bucket has {slots} slots")
        need = sum(v.num_tokens for v in row)
        if need > seq_len:
            raise ValueError(f"row {r} needs {need} tokens but the bucket holds {seq_len}")
        pos = 0
        for j, v in enumerate(row):
            patches = v.patches
            if v.modality == 0 and patch_dim == PATCH * PATCH:
                patches = patches[:, :patch_dim]   # a 2D view: depth slice 0 holds all of it
            n, width = patches.shape
            if width > patch_dim:
                raise ValueError(f"view of sample {v.sample} has patch width {width} > {patch_dim}")
            batch.patches[r, pos:pos + n, :width] = to_wire(patches, dtype)
            batch.segment_ids[r, pos:pos + n] = j + 1
            batch.coords[r, pos:pos + n] = v.coords
            batch.view_sample[r, j] = v.sample
            batch.view_is_global[r, j] = v.is_global
            batch.view_modality[r, j] = v.modality
            batch.view_index[r, j] = v.index
            pos += n
    return batch


def ffd_rows(sizes: Sequence[int], seq_len: int, slots: int) -> list[list[int]]:
    """First-fit decreasing: items (token counts) into rows of ``seq_len`` tokens and at most
    ``slots`` items (vectorised row search). Returns the item indices of each row."""
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


def pack_compact(views: Sequence[View], seq_len: int, slots: int, patch_dim: int | None = None,
                 dtype=np.float32) -> tuple[PackedBatch, dict]:
    """Packs ``views`` into as few rows as first-fit decreasing needs (no bucket padding yet).

    Returns ``(batch, info)`` with ``info`` = ``real_tokens`` and ``rows_needed`` (numpy scalars).
    The bucket is chosen later (:func:`bucket_for`, :func:`pad_rows`): with several processes
    every process must use the same row count, which only the consumer can agree on.
    """
    sizes = [v.num_tokens for v in views]
    assign = ffd_rows(sizes, seq_len, slots)
    batch = pack_rows([[views[i] for i in row] for row in assign], seq_len, slots, patch_dim, dtype)
    return batch, dict(real_tokens=np.int64(sum(sizes)), rows_needed=np.int64(len(assign)))


def pack_groups(views: Sequence[View], groups: Sequence[str], seq_len: int, slots: int,
                dtype=np.float32) -> tuple[tuple[PackedBatch, ...], np.ndarray]:
    """A train batch: the ``"2d"`` views packed into ``P*P``-wide rows and the ``"3d"`` ones into
    ``P**3``-wide rows (one compact group each, in ``groups`` order). Returns the groups and the
    rows each needs (``[len(groups)]``)."""
    out, need = [], []
    for g in groups:
        mod = {"2d": 0, "3d": 1}[g]
        batch, info = pack_compact([v for v in views if v.modality == mod], seq_len, slots,
                                   patch_dim_for(mod == 1), dtype)
        out.append(batch)
        need.append(int(info["rows_needed"]))
    return tuple(out), np.asarray(need, np.int64)


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
                        batch.patches.shape[2], batch.patches.dtype)
    return PackedBatch(*(np.concatenate([x, e]) for x, e in zip(batch, empty)))


def pack_into(views: Sequence[View], rows: int, seq_len: int, slots: int,
              patch_dim: int | None = None) -> PackedBatch:
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


def patch_dim_for(has_3d: bool, p: int = PATCH) -> int:
    """``P**3`` when a batch may hold 3D views, else ``P*P`` (2D depth slice only)."""
    return p ** 3 if has_3d else p * p
