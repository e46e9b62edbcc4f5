"""User inputs -> packed whole-image views (numpy only: shared by the JAX API and ``mmv_jax.torch``).

An input is a file path (anything :func:`mmv_jax.data.readers.load_image` reads) or an array in
physical units: ``[H, W]`` (or ``[1, H, W]``) an X-ray (any intensity scale: it is min-max
normalised), ``[Z, H, W]`` a CT volume in HU in the readers' canonical orientation (axis 0
inferior -> superior). Each becomes exactly what ``mmv-embed`` feeds the encoder: the training
preprocessing (:func:`mmv_jax.data.transforms.load_preprocessed` for files,
:func:`~mmv_jax.data.transforms.preprocess` for arrays) and one whole-image view
(:func:`mmv_jax.data.views.whole_view`), packed by the eval packer's functions
(:func:`mmv_jax.data.packing.pack_into`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from mmv_jax.batch import PackedBatch, View
from mmv_jax.data.manifest import Record
from mmv_jax.data.readers import ImageReadError, file_errors, load_image
from mmv_jax.data.transforms import CT_WINDOW, load_preprocessed, preprocess
from mmv_jax.data.views import whole_view

MODALITIES = ("cxr", "ct")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The training preprocessing of a run (its ``config.data``), as an export records it: the
    options of :func:`~mmv_jax.data.transforms.load_preprocessed`, field for field."""

    long_side_2d: int = 224
    long_side_3d: int = 112
    ct_window: tuple = CT_WINDOW  # (width, level) HU
    max_voxels: int | None = None  # readers' default when None

    @classmethod
    def from_data_config(cls, data) -> Preprocessing:
        mv = data.get("max_image_voxels", 0)
        return cls(
            int(data.views.long_side_2d),
            int(data.views.long_side_3d),
            tuple(float(x) for x in data.ct_window),
            int(mv) if mv else None,
        )


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One input after preprocessing: ``image [Z, H, W]`` in [-1, 1] and its modality."""

    image: np.ndarray
    modality: str
    name: str  # the path, or ``images[i]`` for an array (for error messages)


def _per_item(value, n: int, what: str) -> list:
    """``value`` for every one of ``n`` inputs: None or one value for all, or a list of n."""
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if what == "spacing" and all(isinstance(v, (int, float, np.number)) for v in value):
        return [tuple(value)] * n  # one (z, y, x) or (y, x) for every image
    if len(value) != n:
        raise ValueError(f"{what}: got {len(value)} values for {n} images")
    return value


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def prepare(
    item, prep: Preprocessing, *, spacing=None, modality: str | None = None, name: str = "image"
) -> Prepared:
    """One path or array -> :class:`Prepared`. Raises :class:`ImageReadError` naming the path
    (or ``name``) for anything wrong with this one input."""
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if isinstance(item, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(item))
        if modality is None:
            # read once; the modality from the image itself (2D: an X-ray, 3D: a CT), then the
            # array route below (the same preprocess as load_preprocessed)
            img = load_image(path, spacing=spacing, max_voxels=prep.max_voxels)
            return prepare(img.array, prep, spacing=img.spacing, name=path)
        rec = Record(
            id=path,
            path=path,
            modality=modality,
            dataset="api",
            split="api",
            spacing=None if spacing is None else tuple(float(s) for s in spacing),
        )
        image = load_preprocessed(rec, **dataclasses.asdict(prep))
        return Prepared(image, modality, path)
    arr = _as_array(item)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ImageReadError(
            name, f"expected a [H, W] X-ray or a [Z, H, W] CT array, got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ImageReadError(name, "unsupported dtype")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ImageReadError(name, "non-finite (NaN or Inf) values")
    is_3d = arr.shape[0] > 1
    modality = modality or ("ct" if is_3d else "cxr")
    if (modality == "ct") != is_3d:
        raise ImageReadError(
            name, f"modality {modality} but the array is {'3D' if is_3d else '2D'}"
        )
    if spacing is None:
        if is_3d:  # a silent 1 mm would resample a CT to the wrong shape
            raise ValueError(f"{name}: a [Z, H, W] CT array needs spacing=(z, y, x) in mm")
        spacing = (1.0, 1.0)
    sp = tuple(float(s) for s in spacing)
    sp = (1.0,) + sp if len(sp) == 2 else sp
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"{name}: spacing must be (y, x) or (z, y, x) mm, finite and positive")
    with file_errors(name, "preprocessing"):
        image = preprocess(
            arr,
            sp,
            modality,
            long_side=prep.long_side_3d if is_3d else prep.long_side_2d,
            window=prep.ct_window,
        )
    return Prepared(image, modality, name)


def prepare_all(images, prep: Preprocessing, *, spacing=None, modality=None) -> list[Prepared]:
    """A list of inputs (or one input) -> one :class:`Prepared` each, in order."""
    items = [images] if _is_single(images) else list(images)
    spacings = _per_item(spacing, len(items), "spacing")
    mods = _per_item(modality, len(items), "modality")
    return [
        prepare(
            x,
            prep,
            spacing=s,
            modality=m,
            name=x if isinstance(x, (str, os.PathLike)) else f"images[{i}]",
        )
        for i, (x, s, m) in enumerate(zip(items, spacings, mods))
    ]


def _is_single(images) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    return hasattr(images, "shape") and hasattr(images, "dtype")  # one array or tensor


def views_of(prepared: Sequence[Prepared]) -> list[View]:
    """One whole-image view per input, ``sample`` = its position."""
    out = []
    for i, p in enumerate(prepared):
        with file_errors(p.name, "view"):
            out.append(whole_view(p.image, sample=i, modality=int(p.modality == "ct")))
    return out


def gather(batch: PackedBatch, per_view: np.ndarray, n: int) -> np.ndarray:
    """``per_view [R, V, D]`` of a packed batch -> ``[n, D]`` in sample order."""
    vs = np.asarray(batch.view_sample)
    rows, slots = np.nonzero(vs >= 0)
    out = np.zeros((n, per_view.shape[-1]), np.float32)
    out[vs[rows, slots]] = per_view[rows, slots]
    return out


def token_grid(batch: PackedBatch, tokens: np.ndarray, sample: int) -> np.ndarray:
    """Tokens ``[R, S, D]`` of a packed batch -> the ``sample``'s feature map: ``[gy, gx, D]``
    for a 2D view, ``[gz, gy, gx, D]`` for a 3D one (tokens are in patch order, z slowest)."""
    vs = np.asarray(batch.view_sample)
    r, j = (int(a[0]) for a in np.nonzero(vs == sample))
    keep = np.asarray(batch.segment_ids)[r] == j + 1
    coords = np.asarray(batch.coords)[r][keep]
    grid = [len(np.unique(coords[:, a])) for a in range(3)]
    feats = np.asarray(tokens)[r][keep].reshape(*grid, -1)
    return feats[0] if grid[0] == 1 and int(np.asarray(batch.view_modality)[r, j]) == 0 else feats
