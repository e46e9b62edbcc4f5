"""PackedBatch: the one seam between host data (numpy, Grain workers) and the device model.

A batch is R rows of S tokens. Each row holds whole views (a view never straddles two rows);
the views of one sample may sit in different rows. Inside a row, the view in slot ``j``
(``0 <= j < V``) owns the tokens whose segment id is ``j + 1``; segment id 0 is padding.
Segments are contiguous runs of tokens.

Fields (numpy on the host, jax arrays on device; a NamedTuple is a pytree without importing JAX):

- ``patches``        ``[R, S, P*P*P]`` float — flattened ``(pz, py, px)`` C-order patch cubes. A 2D
                     view is a depth-1 pseudo-volume: only its first ``P*P`` entries (depth slice 0)
                     are non-zero. A bucket that holds only 2D views may carry ``[R, S, P*P]`` (depth
                     slice 0 alone); the encoder embeds both layouts identically.
- ``segment_ids``    ``[R, S]`` int32, 0 = padding, ``j + 1`` = view slot ``j``.
- ``coords``         ``[R, S, 3]`` float32 ``(z, y, x)`` normalised grid coordinates (:func:`grid_coords`).
- ``view_sample``    ``[R, V]`` int32 index of the view's sample in the global batch, -1 = empty slot.
- ``view_is_global`` ``[R, V]`` bool, global (True) or local crop.
- ``view_modality``  ``[R, V]`` int32, 0 = 2D, 1 = 3D.
- ``view_index``     ``[R, V]`` int32 index of the view within its sample (globals first:
                     ``0 .. V_g - 1``, then locals), -1 = empty slot.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

PATCH = 14
ALPHA = 128.0


class PackedBatch(NamedTuple):
    patches: Any
    segment_ids: Any
    coords: Any
    view_sample: Any
    view_is_global: Any
    view_modality: Any
    view_index: Any


class View(NamedTuple):
    """One patchified view, ready to pack (host side)."""

    patches: np.ndarray   # [n, P*P*P] (or [n, P*P] for a 2D view)
    coords: np.ndarray    # [n, 3] float32
    sample: int           # global sample index
    is_global: bool
    modality: int         # 0 = 2D, 1 = 3D
    index: int            # view index within its sample

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])


def axis_coords(g: int, alpha: float = ALPHA) -> np.ndarray:
    """``alpha * i / max(g - 1, 1)`` for ``i = 0 .. g-1`` as float32 (METHOD.md, 3D RoPE)."""
    return (alpha * np.arange(g, dtype=np.float64) / max(g - 1, 1)).astype(np.float32)


def grid_coords(grid: Sequence[int], alpha: float = ALPHA) -> np.ndarray:
    """Per-token ``(z, y, x)`` coordinates ``[gz*gy*gx, 3]`` in patch order (z slowest)."""
    axes = [axis_coords(int(g), alpha) for g in grid]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=-1).astype(np.float32)


def empty_batch(rows: int, seq_len: int, slots: int, patch_dim: int) -> PackedBatch:
    return PackedBatch(
        patches=np.zeros((rows, seq_len, patch_dim), np.float32),
        segment_ids=np.zeros((rows, seq_len), np.int32),
        coords=np.zeros((rows, seq_len, 3), np.float32),
        view_sample=np.full((rows, slots), -1, np.int32),
        view_is_global=np.zeros((rows, slots), bool),
        view_modality=np.zeros((rows, slots), np.int32),
        view_index=np.full((rows, slots), -1, np.int32),
    )


def pack_rows(rows: Sequence[Sequence[View]], seq_len: int, slots: int,
              patch_dim: int | None = None) -> PackedBatch:
    """Writes views already assigned to rows (``rows[r]`` = the views of row ``r``, in order)
    into one bucket of shape ``[len(rows), seq_len]`` with ``slots`` view slots a row.

    ``patch_dim`` defaults to ``P**3`` unless every view is a 2D view with ``P*P`` entries.
    Raises ``ValueError`` when a row does not fit.
    """
    views = [v for row in rows for v in row]
    if patch_dim is None:
        dims = {v.patches.shape[1] for v in views}
        patch_dim = PATCH * PATCH if dims == {PATCH * PATCH} else PATCH ** 3
    batch = empty_batch(len(rows), seq_len, slots, patch_dim)
    for r, row in enumerate(rows):
        if len(row) > slots:
            raise ValueError(f"row {r} holds {len(row)} views but the bucket has {slots} slots")
        need = sum(v.num_tokens for v in row)
        if need > seq_len:
            raise ValueError(f"row {r} needs {need} tokens but the bucket holds {seq_len}")
        pos = 0
        for j, v in enumerate(row):
            n = v.num_tokens
            width = v.patches.shape[1]
            if width > patch_dim:
                raise ValueError(f"view of sample {v.sample} has patch width {width} > {patch_dim}")
            batch.patches[r, pos:pos + n, :width] = v.patches
            batch.segment_ids[r, pos:pos + n] = j + 1
            batch.coords[r, pos:pos + n] = v.coords
            batch.view_sample[r, j] = v.sample
            batch.view_is_global[r, j] = v.is_global
            batch.view_modality[r, j] = v.modality
            batch.view_index[r, j] = v.index
            pos += n
    return batch


def first_fit_rows(sizes: Sequence[int], seq_len: int, slots: int) -> list[list[int]]:
    """First-fit decreasing assignment of items (token counts) to rows of ``seq_len`` tokens and
    at most ``slots`` items; returns the item indices of each row. Raises on an item > seq_len."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if sizes[i] > seq_len:
            raise ValueError(f"a view of {sizes[i]} tokens exceeds the row length {seq_len}")
        for r, f in enumerate(free):
            if sizes[i] <= f and len(rows[r]) < slots:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(seq_len - sizes[i])
    return rows


def pack_views(views: Sequence[View], rows: int, seq_len: int, slots: int,
               patch_dim: int | None = None) -> PackedBatch:
    """Packs views into exactly ``rows`` rows (first-fit decreasing); raises if they do not fit."""
    assignment = first_fit_rows([v.num_tokens for v in views], seq_len, slots)
    if len(assignment) > rows:
        raise ValueError(f"{len(views)} views need {len(assignment)} rows of {seq_len} tokens; "
                         f"the bucket has {rows}")
    assignment += [[] for _ in range(rows - len(assignment))]
    return pack_rows([[views[i] for i in row] for row in assignment], seq_len, slots, patch_dim)


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens over token capacity."""
    seg = np.asarray(batch.segment_ids)
    return float((seg > 0).sum()) / float(seg.size)
