"""Patchify (host side, numpy): a ``[C, Z, H, W]`` volume -> cubic P=14 patch vectors + grid.

A 2D image (``Z == 1``) is a depth-1 pseudo-volume: zero-padded along depth to P with the
image at depth index 0 (METHOD.md), so its grid has ``G_Z = 1``. Its patch vector is either the
full ``C*P*P*P`` cube (13 zero slices) or, with ``depth_slice_only=True``, just the ``C*P*P``
entries of depth slice 0; the encoder embeds both to the same result.

Spatial sizes that are not multiples of P: each axis is centre-cropped to the largest multiple of
P (``mode="crop"``, the default: views are already snapped to multiples of P, so this only trims
odd-sized inputs) or zero-padded at the end to the next multiple (``mode="pad"``). An axis shorter
than P is always padded to P.
"""

from __future__ import annotations

import numpy as np

from mmv_jax.batch import PATCH, View, grid_coords


def _fit_axis(x: np.ndarray, axis: int, p: int, mode: str) -> np.ndarray:
    n = x.shape[axis]
    if n % p == 0:
        return x
    if mode == "crop" and n >= p:
        keep = (n // p) * p
        start = (n - keep) // 2
        return np.take(x, np.arange(start, start + keep), axis=axis)
    if mode not in ("crop", "pad"):
        raise ValueError(f"patchify mode must be 'crop' or 'pad', got {mode!r}")
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -n % p)
    return np.pad(x, pad)


def patchify(
    volume: np.ndarray, p: int = PATCH, *, mode: str = "crop", depth_slice_only: bool = False
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[C, Z, H, W]`` -> (``[G_Z*G_H*G_W, C*P^3]`` float32 patches in (z, y, x) order, grid).

    Each patch vector is flattened as ``(c, pz, py, px)`` in C order.
    """
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 4:
        raise ValueError(f"patchify expects [C, Z, H, W], got shape {volume.shape}")
    c, z = volume.shape[:2]
    is_2d = z == 1
    for axis in (2, 3) if is_2d else (1, 2, 3):
        volume = _fit_axis(volume, axis, p, mode)
    _, z, h, w = volume.shape
    gz, gy, gx = (1 if is_2d else z // p), h // p, w // p
    if is_2d:
        # [C, 1, gy, p, gx, p] -> [gy, gx, C, 1, p, p]
        x = volume.reshape(c, 1, gy, p, gx, p).transpose(2, 4, 0, 1, 3, 5)
        x = x.reshape(gy * gx, c, 1, p, p)
        if not depth_slice_only:
            x = np.concatenate([x, np.zeros((gy * gx, c, p - 1, p, p), np.float32)], axis=2)
        return x.reshape(gy * gx, -1), (1, gy, gx)
    if depth_slice_only:
        raise ValueError("depth_slice_only applies to 2D inputs (Z == 1) only")
    x = volume.reshape(c, gz, p, gy, p, gx, p).transpose(1, 3, 5, 0, 2, 4, 6)
    return np.ascontiguousarray(x.reshape(gz * gy * gx, -1)), (gz, gy, gx)


def make_view(
    image: np.ndarray,
    *,
    sample: int,
    is_global: bool,
    index: int,
    p: int = PATCH,
    depth_slice_only: bool = False,
) -> View:
    """A ``[Z, H, W]`` (or ``[C, Z, H, W]``) array in [-1, 1] -> a packable :class:`View`."""
    if image.ndim == 3:
        image = image[None]
    patches, grid = patchify(image, p, depth_slice_only=depth_slice_only)
    return View(
        patches=patches,
        coords=grid_coords(grid),
        sample=sample,
        is_global=is_global,
        modality=int(image.shape[1] > 1),
        index=index,
    )
