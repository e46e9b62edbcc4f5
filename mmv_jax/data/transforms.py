"""Intensity and geometry transforms (numpy only), METHOD.md "Views and preprocessing".

- :func:`resize_long_side`: resample ``[Z, H, W]`` so that the longest *physical* side has
  ``long_side`` voxels (224 for 2D, 112 for 3D), voxels isotropic afterwards (anisotropic CT
  spacing taken into account; aspect ratio kept; no padding).
- :func:`normalize`: X-ray min-max to [-1, 1]; CT window W=2500, L=250 (HU [-1000, 1500]) to [-1, 1].
- :func:`load_preprocessed`: one manifest record -> its preprocessed image; every failure of that
  one file, whatever raised it, is an :class:`~mmv_jax.data.readers.ImageReadError` naming it.
"""

from __future__ import annotations

import math

import numpy as np

from mmv_jax.data.readers import ImageReadError, file_errors, load_image

CT_WINDOW = (2500.0, 250.0)  # (width, level)


def target_shape(shape, spacing, long_side: int) -> tuple[int, ...]:
    """Output ``[Z, H, W]`` for :func:`resize_long_side` (Z stays 1 for a 2D image).

    Raises ``ValueError`` for an empty shape, a spacing that is not finite and positive or a
    ``long_side`` < 1 (a NaN spacing would otherwise give a garbage integer shape)."""
    z, h, w = (int(v) for v in shape)
    dz, dy, dx = (float(s) for s in spacing)
    if min(z, h, w) < 1:
        raise ValueError("target_shape: every side of the image must be >= 1")
    if not all(math.isfinite(s) and s > 0 for s in (dz, dy, dx)):
        raise ValueError("target_shape: spacing must be finite and positive")
    if int(long_side) < 1:
        raise ValueError("target_shape: long_side must be >= 1")
    if z == 1:
        ext = np.array([h * dy, w * dx])
        out = np.maximum(1, np.round(ext * (long_side / ext.max()))).astype(int)
        return (1, int(out[0]), int(out[1]))
    ext = np.array([z * dz, h * dy, w * dx])
    out = np.maximum(1, np.round(ext * (long_side / ext.max()))).astype(int)
    return tuple(int(v) for v in out)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation (pixel centres aligned), antialiased when shrinking."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    support = max(scale, 1.0)
    j = np.arange(n_in)
    w = np.maximum(0.0, 1.0 - np.abs(j[None, :] - src[:, None]) / support)
    s = w.sum(1, keepdims=True)
    w = np.where(s > 0, w / np.where(s > 0, s, 1), 0)
    # guard: an empty row (cannot happen for support >= 1) falls back to nearest
    return w.astype(np.float32)


def resize_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Resamples one axis to ``n_out``: integer block-mean first (fast area shrink), then a
    small antialiased linear-interpolation matrix for the rest."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    f = n_in // n_out
    if f >= 2:
        k = n_in // f
        start = (n_in - k * f) // 2
        x = np.take(x, np.arange(start, start + k * f), axis=axis) if k * f != n_in else x
        shape = x.shape[:axis] + (k, f) + x.shape[axis + 1 :]
        x = x.reshape(shape).mean(axis=axis + 1, dtype=np.float32)
        n_in = k
        if n_in == n_out:
            return x
    m = _interp_matrix(n_in, n_out)
    y = np.tensordot(m, x, axes=([1], [axis]))  # new axis first
    return np.moveaxis(y, 0, axis)


def resize(arr: np.ndarray, shape) -> np.ndarray:
    """Separable resize of ``[Z, H, W]`` to ``shape`` (shrinking axes first: cheaper)."""
    arr = np.asarray(arr, np.float32)
    order = sorted(range(3), key=lambda a: shape[a] / max(arr.shape[a], 1))
    for a in order:
        arr = resize_axis(arr, a, int(shape[a]))
    return np.ascontiguousarray(arr, np.float32)


def resize_long_side(arr: np.ndarray, spacing, long_side: int) -> tuple[np.ndarray, tuple]:
    """-> (resized ``[Z, H, W]`` float32, new isotropic spacing ``(z, y, x)``)."""
    shape = target_shape(arr.shape, spacing, long_side)
    out = resize(arr, shape)
    z, h, w = arr.shape
    dz, dy, dx = spacing
    new = (dz * z / shape[0] if z > 1 else dz, dy * h / shape[1], dx * w / shape[2])
    return out, new


def normalize_xray(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, np.float32)
    return ((arr - lo) * np.float32(2.0 / (hi - lo)) - 1.0).astype(np.float32)


def normalize_ct(arr: np.ndarray, window=CT_WINDOW) -> np.ndarray:
    width, level = window
    lo = level - width / 2.0
    out = (arr - np.float32(lo)) * np.float32(2.0 / width) - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def normalize(arr: np.ndarray, modality: str, window=CT_WINDOW) -> np.ndarray:
    """X-ray: min-max to [-1, 1]; CT: HU window to [-1, 1]."""
    return normalize_ct(arr, window) if modality == "ct" else normalize_xray(arr)


def preprocess(
    arr: np.ndarray,
    spacing,
    modality: str,
    *,
    long_side: int,
    resized: bool = False,
    window=CT_WINDOW,
) -> np.ndarray:
    """Physical-unit ``[Z, H, W]`` -> resized (unless ``resized``) and normalised [-1, 1]."""
    if not resized:
        arr, _ = resize_long_side(arr, spacing, long_side)
    return normalize(arr, modality, window)


def load_preprocessed(
    rec,
    *,
    long_side_2d: int,
    long_side_3d: int,
    ct_window=CT_WINDOW,
    max_voxels: int | None = None,
) -> np.ndarray:
    """One manifest record (:class:`~mmv_jax.data.manifest.Record`) -> its ``[Z, H, W]`` image
    in [-1, 1]: read (``max_voxels`` bounds the header's claimed size, ``None``: the readers'
    default), check that its dimensionality matches ``rec.modality``, resize (unless
    ``rec.preprocessed``) and normalise.

    Raises only :class:`~mmv_jax.data.readers.ImageReadError` (naming ``rec.path``, with a fixed
    category reason) for anything that goes wrong with this one file -- decoder errors,
    ``MemoryError``, arithmetic errors in the resize -- so that a caller skips the file by
    catching that one type.
    """
    img = load_image(rec.path, **rec.read_kwargs(), max_voxels=max_voxels)
    is_ct = rec.modality == "ct"
    if is_ct and img.array.shape[0] == 1:
        raise ImageReadError(rec.path, "manifest says ct but the image is 2D")
    if not is_ct and img.array.shape[0] != 1:
        raise ImageReadError(rec.path, "manifest says cxr but the image is 3D")
    with file_errors(rec.path, "preprocessing"):
        out = preprocess(
            img.array,
            img.spacing,
            rec.modality,
            long_side=long_side_3d if is_ct else long_side_2d,
            resized=rec.preprocessed,
            window=ct_window,
        )
        if min(out.shape) < 1:
            raise ImageReadError(rec.path, "empty image after preprocessing")
        return out
