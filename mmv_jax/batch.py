"""PackedBatch: the one seam between host data (numpy, Grain workers) and the device model.

A batch is R rows of S tokens. Each row holds whole views (a view never straddles two rows);
the views of one sample may sit in different rows. Inside a row, the view in slot ``j``
(``0 <= j < V``) owns the tokens whose segment id is ``j + 1``; segment id 0 is padding.
Segments are contiguous runs of tokens.

Fields (numpy on the host, jax arrays on device; a NamedTuple is a pytree without importing JAX):

- ``patches``        ``[R, S, P*P*P]`` or ``[R, S, P*P]`` — flattened ``(pz, py, px)`` C-order patch
                     cubes. A 2D view is a depth-1 pseudo-volume: only its first ``P*P`` entries
                     (depth slice 0) are non-zero, so rows that hold only 2D views carry depth slice 0
                     alone (``P*P`` wide); the encoder embeds both layouts identically. The dtype is
                     the wire dtype: float32, bfloat16, float16, or uint8 (``[-1, 1]`` quantised to
                     255 levels, :func:`to_wire`; the encoder maps it back on the device).
- ``segment_ids``    ``[R, S]`` int32, 0 = padding, ``j + 1`` = view slot ``j``.
- ``coords``         ``[R, S, 3]`` float32 ``(z, y, x)`` normalised grid coordinates (:func:`grid_coords`).
- ``view_sample``    ``[R, V]`` int32 index of the view's sample in the global batch, -1 = empty slot.
- ``view_is_global`` ``[R, V]`` bool, global (True) or local crop.
- ``view_modality``  ``[R, V]`` int32, 0 = 2D, 1 = 3D.
- ``view_index``     ``[R, V]`` int32 index of the view within its sample (globals first:
                     ``0 .. V_g - 1``, then locals), -1 = empty slot.

A training step feeds a *tuple* of PackedBatches, one group per modality present (2D rows, then
3D rows), each with its own row count: 2D tokens then travel at ``P*P`` values instead of
``P*P*P`` (93% zeros). The groups share the model's weights and are joined only at the
per-view outputs (``[R, V, ...]``), so no activation moves between devices. Evaluation and the
Python API feed one PackedBatch (2D and 3D views may share it, 2D ones zero-padded to ``P**3``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

PATCH = 14
ALPHA = 128.0
# Row lengths are multiples of this: the attention kernels tile rows in blocks of up to 128 tokens.
SEQ_MULTIPLE = 128


class PackedBatch(NamedTuple):
    patches: Any
    segment_ids: Any
    coords: Any
    view_sample: Any
    view_is_global: Any
    view_modality: Any
    view_index: Any


FIELD_DTYPES = {
    "segment_ids": np.int32,
    "coords": np.float32,
    "view_sample": np.int32,
    "view_is_global": np.bool_,
    "view_modality": np.int32,
    "view_index": np.int32,
}
WIRE_DTYPES = ("float32", "bfloat16", "float16", "uint8")


def wire_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wire-dtype name (bfloat16 comes from ``ml_dtypes``, a JAX dependency
    that needs no JAX import)."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {WIRE_DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_wire(patches: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float patches in ``[-1, 1]`` -> the wire dtype (uint8: ``round((x + 1) * 127.5)``)."""
    if dtype == np.uint8:
        return np.rint((np.clip(patches, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return patches.astype(dtype, copy=False)


def spec(
    rows: int, seq_len: int, slots: int, patch_dim: int, dtype="float32", sharding=None
) -> PackedBatch:
    """The ``jax.ShapeDtypeStruct`` tree of one bucket (AOT compiles, abstract evaluation)."""
    import jax

    shapes = shape_of(rows, seq_len, slots, patch_dim)
    dtypes = dict(
        FIELD_DTYPES, patches=wire_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    )
    return PackedBatch(
        **{
            f: jax.ShapeDtypeStruct(shapes[f], dtypes[f], sharding=sharding)
            for f in PackedBatch._fields
        }
    )


def shape_of(rows: int, seq_len: int, slots: int, patch_dim: int) -> dict:
    """Field name -> shape of one bucket."""
    r, s, v = rows, seq_len, slots
    return dict(
        patches=(r, s, patch_dim),
        segment_ids=(r, s),
        coords=(r, s, 3),
        view_sample=(r, v),
        view_is_global=(r, v),
        view_modality=(r, v),
        view_index=(r, v),
    )


def groups(batch) -> tuple[PackedBatch, ...]:
    """A train batch (tuple of row groups) or one PackedBatch -> a tuple of PackedBatches."""
    return (batch,) if isinstance(batch, PackedBatch) else tuple(batch)


def real_tokens(batch) -> int:
    return int(sum(int((np.asarray(g.segment_ids) > 0).sum()) for g in groups(batch)))


def nbytes(batch) -> int:
    """Bytes of a host batch (what crosses to the devices)."""
    return int(sum(np.asarray(x).nbytes for g in groups(batch) for x in g))


class View(NamedTuple):
    """One patchified view, ready to pack (host side)."""

    patches: np.ndarray  # [n, P*P*P] (or [n, P*P] for a 2D view)
    coords: np.ndarray  # [n, 3] float32
    sample: int  # global sample index
    is_global: bool
    modality: int  # 0 = 2D, 1 = 3D
    index: int  # view index within its sample

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])


def axis_coords(g: int, alpha: float = ALPHA) -> np.ndarray:
    """``alpha * i / max(g - 1, 1)`` for ``i = 0 .. g-1`` as float32 (METHOD.md, 3D RoPE)."""
    return (alpha * np.arange(g, dtype=np.float64) / max(g - 1, 1)).astype(np.float32)


def grid_coords(grid: Sequence[int], alpha: float = ALPHA) -> np.ndarray:
    """Per-token ``(z, y, x)`` coordinates ``[gz*gy*gx, 3]`` in patch order (z slowest); one
    shared read-only array per grid (a batch draws thousands of views from a few dozen grids)."""
    return _grid_coords(tuple(int(g) for g in grid), float(alpha))


@functools.lru_cache(maxsize=4096)
def _grid_coords(grid: tuple[int, ...], alpha: float) -> np.ndarray:
    axes = [axis_coords(g, alpha) for g in grid]
    mesh = np.meshgrid(*axes, indexing="ij")
    out = np.stack([m.reshape(-1) for m in mesh], axis=-1).astype(np.float32)
    out.flags.writeable = False
    return out


def packing_efficiency(batch) -> float:
    """Real tokens over token capacity (a PackedBatch or a train batch's groups)."""
    cap = sum(int(np.asarray(g.segment_ids).size) for g in groups(batch))
    return real_tokens(batch) / cap
