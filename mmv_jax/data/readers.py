"""Image readers: one path -> one float32 ``[Z, H, W]`` array in physical units (numpy only).

Contract (ARCHITECTURE.md): ``load_image(path) -> ImageRecord(array, spacing, modality, source)``.

- ``array``: float32 ``[Z, H, W]``; ``Z == 1`` for a 2D image. CT in Hounsfield units (rescale
  slope/intercept applied); X-ray with MONOCHROME1 inverted so that bone is bright. DICOM: the
  modality LUT (Modality LUT Sequence, else rescale), then for a single-frame X-ray the file's
  first VOI LUT or window (VOI LUT Sequence preferred, else WindowCenter/Width) when present.
- ``spacing``: ``(z, y, x)`` millimetres per voxel (``1.0`` where the file carries none).
- ``modality``: ``"cxr"`` (2D radiograph) or ``"ct"`` (3D volume).
- ``source``: the format read (``"dicom"``, ``"dicom-series"``, ``"png"``, ``"jpg"``, ``"nifti"``, ``"npy"``, ``"npz"``).

Canonical orientation of 3D volumes: axis 0 runs inferior -> superior, axis 1 anterior ->
posterior (image top = anterior), axis 2 patient right -> patient left (radiological display).
NIfTI volumes are reoriented to it from their header affine; DICOM series are ordered by slice
position along the slice normal and reoriented from ImageOrientationPatient (an axial series in
the usual orientation is already canonical). ``.npy``/``.npz`` and multi-frame DICOM are taken as
stored.

Formats: DICOM (one file; pydicom with the pylibjpeg plugins for JPEG baseline/lossless, JPEG-LS,
JPEG 2000, RLE; multi-frame files are volumes), a folder of DICOM slices (one series),
PNG/JPG (MIMIC-CXR-JPG), NIfTI ``.nii``/``.nii.gz`` (nibabel), ``.npy`` and ``.npz`` (one array,
key ``ct`` if present: RAD-ChestCT). ``.npy``/``.npz`` arrays are ``[Z, H, W]`` already in canonical order.
Anything unreadable raises :class:`ImageReadError` (a ``ValueError``) that names the path and
the reason, never a patient identifier.

Bad files are never fatal and never leak: every exception raised while reading one file
(decoder errors, ``MemoryError``, arithmetic) becomes an :class:`ImageReadError` whose reason is
a fixed category plus, at most, a tag name (``non-numeric RescaleSlope``, ``pixel data decoding
failed (ValueError)``) -- never the text of a header value, which may be an identifier written
into the wrong tag. Sizes claimed by a header are checked against ``max_voxels`` before anything
is allocated, and spacing and rescale values must be finite (spacing positive). pydicom's own
log records (which quote element values) are dropped while a file is read here, and elsewhere
dropped below ERROR and reduced to a fixed text above it; its Python warnings are ignored.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Largest image, in voxels (times samples per pixel), that a reader will allocate: 2**30 admits
# a 512 x 512 x 4096 CT (4 GiB as float32) and refuses a header claiming 30000^3 before any
# allocation. The config key ``data.max_image_voxels`` passes its own value as ``max_voxels``.
DEFAULT_MAX_VOXELS = 1 << 30


class ImageReadError(ValueError):
    """An input that cannot be turned into an image; the message names the path and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes (the default would pass one arg)
        return type(self), (self.path, self.reason)


def _is_file_error(exc: BaseException) -> bool:
    # Rust (pyo3) decoders -- pylibjpeg-rle among them -- turn a panic on a malformed file into
    # pyo3_runtime.PanicException, a BaseException: a bad file all the same
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class file_errors:
    """``with file_errors(path, stage):`` turns any ``Exception`` raised inside (``MemoryError``,
    ``ZeroDivisionError``, a decoder's error, ...) into one :class:`ImageReadError` for ``path``
    with a fixed reason: ``"<stage> failed (<exception type>)"`` or ``"<stage>: out of memory"``.
    The original message is dropped (``from None``, not quoted): decoders quote header values,
    and a header value may be an identifier. An :class:`ImageReadError` passes through unchanged;
    ``KeyboardInterrupt``/``SystemExit`` are not caught (a Rust decoder's panic is)."""

    def __init__(self, path, stage: str = "reading"):
        self.path = os.fspath(path)
        self.stage = stage

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is None or isinstance(exc, ImageReadError) or not _is_file_error(exc):
            return False
        if isinstance(exc, MemoryError):
            reason = f"{self.stage}: out of memory"
        else:
            mod = etype.__module__.split(".")[0]
            name = etype.__qualname__ if mod == "builtins" else f"{mod}.{etype.__qualname__}"
            reason = f"{self.stage} failed ({name})"
        raise ImageReadError(self.path, reason) from None


class ImageRecord(NamedTuple):
    array: np.ndarray  # float32 [Z, H, W]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    modality: str  # "cxr" | "ct"
    source: str


_NIFTI = (".nii", ".nii.gz")
_RASTER = (".png", ".jpg", ".jpeg")


def _kind(path: str) -> str:
    low = path.lower()
    if os.path.isdir(path):
        return "dicom-series"
    if low.endswith(_NIFTI):
        return "nifti"
    if low.endswith(_RASTER):
        return "jpg" if low.endswith((".jpg", ".jpeg")) else "png"
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".npz"):
        return "npz"
    return "dicom"  # .dcm, .dicom or extension-less files


def _check_size(path: str, dims, max_voxels: int, what: str = "header") -> None:
    """Refuses a claimed size before allocation (python ints: no overflow for absurd headers)."""
    n = 1
    for d in dims:
        d = int(d)
        if d < 0:
            raise ImageReadError(path, f"{what} claims a negative dimension")
        n *= d
    if n > max_voxels:
        raise ImageReadError(path, f"{what} claims more voxels than max_image_voxels={max_voxels}")


def load_image(
    path,
    *,
    modality: str | None = None,
    spacing: Sequence[float] | None = None,
    hu_slope: float | None = None,
    hu_intercept: float | None = None,
    orientation: Sequence[float] | None = None,
    max_voxels: int | None = None,
) -> ImageRecord:
    """Reads one image (see the module docstring for the contract).

    Keyword overrides come from the manifest: ``modality`` (``"cxr"``/``"ct"``), ``spacing``
    ``(z, y, x)`` mm (or ``(y, x)`` for 2D), ``hu_slope``/``hu_intercept`` (applied to the raw
    stored values in place of the file's own scaling) and ``orientation`` (DICOM
    ImageOrientationPatient, six direction cosines, for NIfTI files whose header carries none;
    CT-RATE). ``max_voxels`` (default :data:`DEFAULT_MAX_VOXELS`; config
    ``data.max_image_voxels``) bounds the size a header may claim. Raises
    :class:`ImageReadError` for anything unreadable, whatever the underlying exception.
    """
    path = os.fspath(path)
    max_voxels = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    kind = _kind(path)
    if kind != "dicom-series" and os.path.getsize(path) == 0:
        raise ImageReadError(path, "zero-byte file")
    with file_errors(path, "reading"), warnings.catch_warnings(), _reading():
        warnings.simplefilter("ignore")
        for name, v in (("hu_slope", hu_slope), ("hu_intercept", hu_intercept)):
            if v is not None and not math.isfinite(float(v)):
                raise ImageReadError(path, f"non-finite {name} override")
        arr, sp, mod = _READERS[kind](path, hu_slope, hu_intercept, orientation, max_voxels)
        if modality is not None:
            if modality not in ("cxr", "ct"):
                raise ImageReadError(path, "unknown modality (expected cxr or ct)")
            mod = modality
        if spacing is not None:
            sp = tuple(float(s) for s in spacing)
            sp = (1.0,) + sp if len(sp) == 2 else sp
        sp = tuple(float(s) for s in sp)
        if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
            # the readers refuse bad spacing tags by name; this catches the rest (NIfTI pixdim)
            raise ImageReadError(path, "non-finite or non-positive voxel spacing")
        return ImageRecord(_check(path, arr), sp, mod, kind)


def _check(path: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageReadError(path, "empty image")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageReadError(path, f"expected 2D or 3D data, got {arr.ndim}D")
    integer = np.issubdtype(arr.dtype, np.integer)
    arr = np.asarray(arr, np.float32)
    if not integer and not np.isfinite(arr).all():
        raise ImageReadError(path, "non-finite (NaN or Inf) values")
    if min(arr.shape) < 1:
        raise ImageReadError(path, "empty image")
    return np.ascontiguousarray(arr)


_READING = threading.local()


@contextlib.contextmanager
def _reading():
    """Marks this thread as inside :func:`load_image` (for ``mmv_jax.data.dicom``'s log filter)."""
    _READING.depth = getattr(_READING, "depth", 0) + 1
    try:
        yield
    finally:
        _READING.depth -= 1


def _iop_affine(orientation, spacing_xyz) -> np.ndarray:
    """Affine (RAS) from DICOM ImageOrientationPatient, with array axes (i, j, k) = (column
    direction along the row cosine, row direction along the column cosine, slice normal)."""
    iop = np.asarray(orientation, float).reshape(6)
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    lps = np.stack([r, c, n], axis=1) * np.asarray(spacing_xyz, float)[None]
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps  # LPS -> RAS
    return aff


def _read_nifti(path, hu_slope, hu_intercept, orientation, max_voxels):
    import nibabel as nib

    with file_errors(path, "NIfTI header parsing"):
        img = nib.load(path)  # the header only; voxels are read below
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise ImageReadError(path, f"{len(shape)}D data is not supported")
    _check_size(path, shape, max_voxels)
    if hu_slope is not None or hu_intercept is not None:
        arr = np.asanyarray(
            img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled") else img.dataobj
        ).astype(np.float32)
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept
        )
    else:
        slope, inter = img.dataobj.slope, img.dataobj.inter
        for name, v in (("scl_slope", slope), ("scl_inter", inter)):
            if v is not None and not np.isfinite(v):
                raise ImageReadError(path, f"non-finite {name}")
        raw_ok = (
            np.issubdtype(img.get_data_dtype(), np.integer)
            and slope in (1, None)
            and inter in (0, None)
        )
        # integer voxels stay integer through the reorientation (half the memory traffic)
        arr = np.asanyarray(img.dataobj) if raw_ok else img.get_fdata(dtype=np.float32)
    arr = arr.reshape(shape[:3] if len(shape) >= 3 else shape)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - len(shape[:3]))
    if orientation is not None:
        # the affine's scale does not change the axis order: a bad pixdim must not block a
        # manifest that overrides the spacing (it is checked in load_image after the override)
        aff = _iop_affine(orientation, [z if math.isfinite(z) and z > 0 else 1.0 for z in zooms])
    else:
        aff = img.affine
    if not np.isfinite(aff).all():
        raise ImageReadError(path, "non-finite affine (srow/qform)")
    # zero or NaN pixdim passes here: load_image checks the spacing after the manifest's override
    arr, spacing = _to_canonical(arr, aff, zooms)
    return arr, spacing, "ct" if arr.shape[0] > 1 else "cxr"


def _to_canonical(arr_ijk: np.ndarray, affine: np.ndarray, zooms_ijk) -> tuple[np.ndarray, tuple]:
    """Voxel array ``[i, j, k]`` with a RAS ``affine`` -> canonical ``[Z (I->S), Y (A->P),
    X (R->L)]`` and its ``(z, y, x)`` spacing."""
    from nibabel import orientations as no

    ornt = no.io_orientation(affine)
    arr = no.apply_orientation(arr_ijk, ornt)  # now RAS+ (x->R, y->A, z->S)
    sx, sy, sz = (float(zooms_ijk[int(a)]) for a in ornt[:, 0])
    arr = np.ascontiguousarray(arr[::-1, ::-1, :].transpose(2, 1, 0))
    return arr, (sz, sy, sx)


# ---------------------------------------------------------------- NPY / PNG / JPG


def _npz_member_shape(z, key: str):
    """Shape from an ``.npz`` member's ``.npy`` header, read without decompressing the data."""
    fmt = np.lib.format
    with z.zip.open(key + ".npy") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        return None if read is None else read(f)[0]


def _read_npy(path, hu_slope, hu_intercept, max_voxels):
    if path.lower().endswith(".npz"):  # RAD-ChestCT: one array per file (key "ct" if present)
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise ImageReadError(path, "empty .npz archive")
            key = "ct" if "ct" in z.files else z.files[0]
            shape = _npz_member_shape(z, key)
            if shape is not None:
                _check_size(path, shape, max_voxels)
            arr = z[key]
    else:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # header only (memory map)
    if arr.ndim not in (2, 3):
        raise ImageReadError(path, f"expected 2D or 3D data, got {arr.ndim}D")
    _check_size(path, arr.shape, max_voxels)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ImageReadError(path, "unsupported dtype")
    arr = np.asarray(arr, np.float32)
    if hu_slope is not None or hu_intercept is not None:
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept
        )
    if arr.ndim == 2:
        arr = arr[None]
    return arr, (1.0, 1.0, 1.0), "ct" if arr.shape[0] > 1 else "cxr"


def _read_raster(path, max_voxels):
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        _check_size(path, (im.size[0], im.size[1], len(im.getbands())), max_voxels)
        im.load()  # decodes fully: a truncated file raises here
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
        elif im.mode in ("L", "F"):
            arr = np.asarray(im, dtype=np.float32)
        else:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    return arr[None], (1.0, 1.0, 1.0), "cxr"


def _dicom():
    """The DICOM readers (``mmv_jax.data.dicom``), imported on first use: that module builds on
    this one's errors and size checks."""
    from mmv_jax.data import dicom

    return dicom


# every reader: (path, hu_slope, hu_intercept, orientation, max_voxels)
#   -> (array, spacing, modality)
_READERS = {
    "dicom": lambda p, s, i, o, m: _dicom().read_file(p, s, i, m),
    "dicom-series": lambda p, s, i, o, m: _dicom().read_series(p, s, i, m),
    "nifti": _read_nifti,
    "npy": lambda p, s, i, o, m: _read_npy(p, s, i, m),
    "npz": lambda p, s, i, o, m: _read_npy(p, s, i, m),
    "png": lambda p, s, i, o, m: _read_raster(p, m),
    "jpg": lambda p, s, i, o, m: _read_raster(p, m),
}
