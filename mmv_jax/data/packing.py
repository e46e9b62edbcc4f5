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

import itertools
from collections.abc import Sequence

import numpy as np

from mmv_jax.batch import FIELD_DTYPES, PATCH, PackedBatch, View, shape_of, to_wire


class BucketError(ValueError):
    """A batch that fits no configured bucket (a configuration error)."""


def empty_batch(
    rows: int,
    seq_len: int,
    slots: int,
    patch_dim: int,
    dtype=np.float32,
    *,
    zero_patches: bool = True,
) -> PackedBatch:
    """A bucket with no views. ``zero_patches=False`` leaves the patches uninitialised for a
    writer that fills every entry (zeroing half a gigabyte first costs as much as the copy)."""
    shapes = shape_of(rows, seq_len, slots, patch_dim)
    dtypes = dict(FIELD_DTYPES, patches=dtype)
    fill = dict(view_sample=-1, view_index=-1)
    out = {
        f: np.full(shapes[f], fill.get(f, 0), dtypes[f])
        for f in PackedBatch._fields
        if f != "patches"
    }
    out["patches"] = (np.zeros if zero_patches else np.empty)(shapes["patches"], dtype)
    return PackedBatch(**out)


def pack_rows(
    rows: Sequence[Sequence[View]],
    seq_len: int,
    slots: int,
    patch_dim: int | None = None,
    dtype=np.float32,
) -> PackedBatch:
    """Writes views already assigned to rows (``rows[r]`` = the views of row ``r``, in order)
    into one bucket of shape ``[len(rows), seq_len]`` with ``slots`` view slots a row, patches in
    the wire ``dtype`` (:func:`mmv_jax.batch.to_wire`).

    ``patch_dim`` defaults to ``P**3`` unless every view is a 2D view with ``P*P`` entries.
    Raises ``ValueError`` when a row does not fit.
    """
    dtype = np.dtype(dtype)
    if patch_dim is None:
        dims = {v.patches.shape[1] for row in rows for v in row}
        patch_dim = PATCH * PATCH if dims == {PATCH * PATCH} else PATCH**3
    batch = empty_batch(len(rows), seq_len, slots, patch_dim, dtype, zero_patches=False)
    zero = np.zeros((), dtype)
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
                patches = patches[:, :patch_dim]  # a 2D view: depth slice 0 holds all of it
            n, width = patches.shape
            if width > patch_dim:
                raise ValueError(f"view of sample {v.sample} has patch width {width} > {patch_dim}")
            # a float wire dtype casts during the copy, without a temporary
            batch.patches[r, pos : pos + n, :width] = (
                to_wire(patches, dtype) if dtype == np.uint8 else patches
            )
            batch.patches[r, pos : pos + n, width:] = zero
            batch.segment_ids[r, pos : pos + n] = j + 1
            batch.coords[r, pos : pos + n] = v.coords
            batch.view_sample[r, j] = v.sample
            batch.view_is_global[r, j] = v.is_global
            batch.view_modality[r, j] = v.modality
            batch.view_index[r, j] = v.index
            pos += n
        batch.patches[r, pos:] = zero  # padding tokens
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


def pack_compact(
    views: Sequence[View], seq_len: int, slots: int, patch_dim: int | None = None, dtype=np.float32
) -> tuple[PackedBatch, dict]:
    """Packs ``views`` into as few rows as first-fit decreasing needs (no bucket padding yet).

    Returns ``(batch, info)`` with ``info`` = ``real_tokens`` and ``rows_needed`` (numpy scalars).
    The bucket is chosen later (:func:`bucket_for`, :func:`pad_rows`): with several processes
    every process must use the same row count, which only the consumer can agree on.
    """
    sizes = [v.num_tokens for v in views]
    assign = ffd_rows(sizes, seq_len, slots)
    batch = pack_rows([[views[i] for i in row] for row in assign], seq_len, slots, patch_dim, dtype)
    return batch, dict(real_tokens=np.int64(sum(sizes)), rows_needed=np.int64(len(assign)))


def pack_groups(
    views: Sequence[View], groups: Sequence[str], seq_len: int, slots: int, dtype=np.float32
) -> tuple[tuple[PackedBatch, ...], np.ndarray]:
    """A train batch: the ``"2d"`` views packed into ``P*P``-wide rows and the ``"3d"`` ones into
    ``P**3``-wide rows (one compact group each, in ``groups`` order). Returns the groups and the
    rows each needs (``[len(groups)]``)."""
    out, need = [], []
    for g in groups:
        mod = {"2d": 0, "3d": 1}[g]
        batch, info = pack_compact(
            [v for v in views if v.modality == mod], seq_len, slots, patch_dim_for(mod == 1), dtype
        )
        out.append(batch)
        need.append(int(info["rows_needed"]))
    return tuple(out), np.asarray(need, np.int64)


def bucket_for(rows_needed, buckets):
    """The cheapest step shape that holds ``rows_needed``: ints -> the smallest of ``buckets``
    that is at least as large; tuples (one count per row group) -> the tuple of ``buckets``
    with the fewest rows in all that covers every group. :class:`BucketError` if none does."""
    scalar = np.ndim(rows_needed) == 0
    need = np.atleast_1d(np.asarray(rows_needed, np.int64))
    fits = [
        b
        for b in sorted(buckets, key=lambda b: int(np.sum(b)))
        if (np.atleast_1d(np.asarray(b)) >= need).all()
    ]
    if not fits:
        raise BucketError(
            f"a batch needs {need.tolist() if not scalar else int(need[0])} rows but the largest "
            f"bucket has {max(buckets, key=lambda b: int(np.sum(b)))}; raise "
            f"data.buckets.rows_2d / rows_3d (or seq_len), or set them to () to size them "
            f"automatically from data.buckets.nominal_*_shape"
        )
    return fits[0]


def pad_rows(batch: PackedBatch, rows: int) -> PackedBatch:
    """Appends empty rows (padding tokens, empty view slots) up to ``rows``."""
    extra = rows - batch.segment_ids.shape[0]
    if extra < 0:
        raise ValueError(f"batch has {batch.segment_ids.shape[0]} rows, more than {rows}")
    if extra == 0:
        return batch
    empty = empty_batch(
        extra,
        batch.segment_ids.shape[1],
        batch.view_sample.shape[1],
        batch.patches.shape[2],
        batch.patches.dtype,
    )
    return PackedBatch(*(np.concatenate([x, e]) for x, e in zip(batch, empty)))


def pack_into(
    views: Sequence[View], rows: int, seq_len: int, slots: int, patch_dim: int | None = None
) -> PackedBatch:
    """Packs ``views`` into exactly ``rows`` rows (first-fit decreasing, then empty rows); raises
    ``ValueError`` when they need more. Evaluation batches, whose shape is fixed in advance."""
    batch, _ = pack_compact(views, seq_len, slots, patch_dim)
    return pad_rows(batch, rows)


def rows_needed(sizes: Sequence[int], seq_len: int, slots: int) -> int:
    return len(ffd_rows(sizes, seq_len, slots))


def choose_buckets(
    needed, max_shapes: int, multiple_of: int = 1, margin_sigma: float = 6.0
) -> tuple[tuple[int, ...], ...]:
    """Step shapes for row groups: ``needed`` ``[N, G]`` sampled rows needed per group ->
    at most ``max_shapes`` tuples of ``G`` row counts (multiples of ``multiple_of``) minimising
    the expected padding rows when each step takes the cheapest tuple covering its needs
    (:func:`bucket_for`). One tuple is always the safety shape: per group the sample maximum
    and ``mean + margin_sigma * std`` (+1 row), so real batches practically always fit; the
    others are chosen among the sampled needs (a joint choice: with two groups their shapes
    need not form a grid)."""
    needed = np.asarray(needed, np.int64).reshape(len(needed), -1)
    m = max(1, int(multiple_of))
    up = lambda x: (np.ceil(np.asarray(x) / m) * m).astype(np.int64)
    top = tuple(
        int(v)
        for v in up(np.maximum(needed.max(0), needed.mean(0) + margin_sigma * needed.std(0)) + 1)
    )
    cands = sorted({tuple(int(v) for v in up(n)) for n in needed} - {top})
    # cost[c, i]: padding rows when sample i takes candidate c (inf where c does not cover it)
    table = np.asarray(cands + [top], np.int64).reshape(-1, needed.shape[1])
    covers = (table[:, None, :] >= needed[None]).all(-1)
    cost = np.where(covers, table.sum(1)[:, None] - needed.sum(1)[None], np.inf)
    best, pick = cost[-1].mean(), ()
    for k in range(1, min(max_shapes - 1, len(cands)) + 1):
        for combo in itertools.combinations(range(len(cands)), k):
            c = np.minimum(cost[list(combo)].min(0), cost[-1]).mean()
            if c < best - 1e-9:
                best, pick = c, combo
    return tuple(sorted([cands[i] for i in pick] + [top], key=sum))


def patch_dim_for(has_3d: bool, p: int = PATCH) -> int:
    """``P**3`` when a batch may hold 3D views, else ``P*P`` (2D depth slice only)."""
    return p**3 if has_3d else p * p
