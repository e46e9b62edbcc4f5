"""Random views (numpy only): ``n_global`` + ``n_local`` aspect-ratio-preserving crops.

Same recipe for 2D and 3D (METHOD.md): a view covers a fraction ``s`` of the image area (2D) or
volume (3D), ``s`` uniform in the view's scale range (global ``[0.3, 1.0]``, local
``[0.05, 0.3]``); every side is the image side times ``s ** (1/d)``, snapped to a multiple of
P = 14 (at least one patch, at most the largest multiple that fits). After snapping, the crop's
fraction of the whole image is nudged back into the scale range where the patch grid allows.
Crops keep their native resolution (no resize), so their token counts vary. Flips are drawn
per view. All randomness comes from the ``numpy.random.Generator`` passed in: the same seed
gives the same views on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmv_jax.batch import PATCH, View
from mmv_jax.data.patches import make_view


def crop_shape(
    rng: np.random.Generator, dims: Sequence[int], scale: Sequence[float], p: int = PATCH
) -> tuple[int, ...]:
    """Samples a crop size (per axis, multiples of ``p`` clipped to the image) for ``dims``.

    One ``rng.uniform`` draw; the rest is deterministic integer arithmetic (plain Python: this
    runs 10 times per sample).
    """
    dims = [int(x) for x in dims]
    d = len(dims)
    lo, hi = float(scale[0]), float(scale[1])
    # checked here, not assumed: a zero side divides by zero below, a NaN scale cannot round
    if d < 1 or min(dims) < 1:
        raise ValueError("crop_shape: every image side must be >= 1")
    if not 0 < lo <= hi <= 1:
        raise ValueError("crop_shape: scale must satisfy 0 < lo <= hi <= 1")
    if int(p) < 1:
        raise ValueError("crop_shape: patch size must be >= 1")
    s = float(rng.uniform(lo, hi))
    g = [x / p for x in dims]
    gmax = [max(1, int(x // p)) for x in dims]
    f = s ** (1.0 / d)
    k = [min(max(1, int(round(gi * f))), gm) for gi, gm in zip(g, gmax)]
    total = 1.0
    for x in dims:
        total *= x

    def frac(k):
        v = 1.0
        for kk, dd in zip(k, dims):
            v *= min(kk * p, dd)
        return v / total

    for _ in range(4 * sum(gmax)):
        cur = frac(k)
        if cur < lo:
            grow = [i for i in range(d) if k[i] < gmax[i]]
            if not grow:
                break
            i = min(grow, key=lambda i: k[i] / g[i])
            k[i] += 1
            new = frac(k)
            if new > hi:  # cannot enter the range on this grid: keep the closer one
                if new - hi > lo - cur:
                    k[i] -= 1
                break
        elif cur > hi:
            shrink = [i for i in range(d) if k[i] > 1]
            if not shrink:
                break
            i = max(shrink, key=lambda i: k[i] / g[i])
            k[i] -= 1
            new = frac(k)
            if new < lo:
                if lo - new > cur - hi:
                    k[i] += 1
                break
        else:
            break
    return tuple(min(kk * p, dd) for kk, dd in zip(k, dims))


def random_crop(rng: np.random.Generator, image: np.ndarray, scale, p: int = PATCH):
    """Crop of ``image`` ``[Z, H, W]`` (spatial axes: H, W for Z == 1, else Z, H, W)."""
    is_2d = image.shape[0] == 1
    dims = image.shape[1:] if is_2d else image.shape
    size = crop_shape(rng, dims, scale, p)
    start = [int(rng.integers(0, n - c + 1)) for n, c in zip(dims, size)]
    sl = tuple(slice(s, s + c) for s, c in zip(start, size))
    return image[(slice(None),) + sl] if is_2d else image[sl]


def _flip(rng: np.random.Generator, crop: np.ndarray, flips: Sequence[float]) -> np.ndarray:
    """``flips`` = probabilities for (left-right [W], anterior-posterior [H], superior-inferior
    [Z, 3D only]); one uniform draw per axis, always consumed (deterministic stream)."""
    u = rng.random(3)
    lr, ap, si = (list(flips) + [0.0, 0.0, 0.0])[:3]
    if u[0] < lr:
        crop = crop[:, :, ::-1]
    if u[1] < ap:
        crop = crop[:, ::-1, :]
    if u[2] < si and crop.shape[0] > 1:
        crop = crop[::-1]
    return crop


def sample_views(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    sample: int,
    modality: int,
    n_global: int = 2,
    n_local: int = 8,
    global_scale=(0.3, 1.0),
    local_scale=(0.05, 0.3),
    flips=(0.5, 0.0, 0.0),
    p: int = PATCH,
) -> list[View]:
    """``image`` ``[Z, H, W]`` in [-1, 1] -> ``n_global`` then ``n_local`` patchified views
    (``View.index`` 0.. in that order). 2D views carry ``P*P`` patch vectors (depth slice 0)."""
    views = []
    for idx in range(n_global + n_local):
        is_global = idx < n_global
        crop = random_crop(rng, image, global_scale if is_global else local_scale, p)
        crop = _flip(rng, crop, flips)
        v = make_view(
            np.ascontiguousarray(crop),
            sample=sample,
            is_global=is_global,
            index=idx,
            p=p,
            depth_slice_only=image.shape[0] == 1,
        )
        views.append(v._replace(modality=int(modality)))
    return views


def whole_view(image: np.ndarray, *, sample: int, modality: int, p: int = PATCH) -> View:
    """The deterministic evaluation view: the whole (resized) image, centre-trimmed to the patch
    grid, ``index`` 0, global."""
    v = make_view(
        image, sample=sample, is_global=True, index=0, p=p, depth_slice_only=image.shape[0] == 1
    )
    return v._replace(modality=int(modality))


def view_grids(
    rng: np.random.Generator,
    shape,
    *,
    n_global=2,
    n_local=8,
    global_scale=(0.3, 1.0),
    local_scale=(0.05, 0.3),
    p: int = PATCH,
) -> list[tuple[int, int, int]]:
    """Patch grids ``(gz, gy, gx)`` of the views :func:`sample_views` would draw for an image of
    ``shape`` (geometry only: it sizes the packing buckets, and the benchmarks draw their views
    with it)."""
    is_2d = shape[0] == 1
    dims = shape[1:] if is_2d else shape
    out = []
    for idx in range(n_global + n_local):
        size = crop_shape(rng, dims, global_scale if idx < n_global else local_scale, p)
        grid = tuple(max(1, c // p) for c in size)
        out.append((1, *grid) if is_2d else grid)
    return out


def view_tokens(rng: np.random.Generator, shape, **kwargs) -> list[int]:
    """Token counts of the views :func:`view_grids` draws (the same keywords)."""
    return [gz * gy * gx for gz, gy, gx in view_grids(rng, shape, **kwargs)]
