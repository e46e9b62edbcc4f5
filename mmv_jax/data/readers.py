"""Image readers: one path -> one float32 ``[Z, H, W]`` array in physical units (numpy only).

Contract (ARCHITECTURE.md): ``load_image(path) -> ImageRecord(array, spacing, modality, source)``.

- ``array``: float32 ``[Z, H, W]``; ``Z == 1`` for a 2D image. CT in Hounsfield units (rescale
  slope/intercept applied); X-ray with MONOCHROME1 inverted so that bone is bright.
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
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Sequence

import numpy as np


class ImageReadError(ValueError):
    """An input that cannot be turned into an image; the message names the path and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")


class ImageRecord(NamedTuple):
    array: np.ndarray                    # float32 [Z, H, W]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    modality: str                        # "cxr" | "ct"
    source: str


_NIFTI = (".nii", ".nii.gz")
_RASTER = (".png", ".jpg", ".jpeg")
_XRAY_MODALITIES = {"CR", "DX", "DR", "RG", "MG", "XA", "RF", "PX", "IO"}


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


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:200]}"


def load_image(path, *, modality: str | None = None,
               spacing: Sequence[float] | None = None,
               hu_slope: float | None = None, hu_intercept: float | None = None,
               orientation: Sequence[float] | None = None) -> ImageRecord:
    """Reads one image (see the module docstring for the contract).

    Keyword overrides come from the manifest: ``modality`` (``"cxr"``/``"ct"``), ``spacing``
    ``(z, y, x)`` mm (or ``(y, x)`` for 2D), ``hu_slope``/``hu_intercept`` (applied to the raw
    stored values in place of the file's own scaling) and ``orientation`` (DICOM
    ImageOrientationPatient, six direction cosines, for NIfTI files whose header carries none;
    CT-RATE). Raises :class:`ImageReadError` for anything unreadable.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    kind = _kind(path)
    if kind != "dicom-series" and os.path.getsize(path) == 0:
        raise ImageReadError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, sp, mod = _READERS[kind](path, hu_slope, hu_intercept, orientation)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # every decoder failure becomes one clear error
        raise ImageReadError(path, _reason(e)) from None
    if modality is not None:
        if modality not in ("cxr", "ct"):
            raise ImageReadError(path, f"unknown modality {modality!r}")
        mod = modality
    if spacing is not None:
        sp = tuple(float(s) for s in spacing)
        sp = (1.0,) + sp if len(sp) == 2 else sp
    return ImageRecord(_check(path, arr), tuple(float(s) for s in sp), mod, kind)


def _check(path: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageReadError(path, f"empty image (shape {arr.shape})")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageReadError(path, f"expected 2D or 3D data, got {arr.ndim}D shape {arr.shape}")
    integer = np.issubdtype(arr.dtype, np.integer)
    arr = np.asarray(arr, np.float32)
    if not integer and not np.isfinite(arr).all():
        raise ImageReadError(path, "non-finite (NaN or Inf) values")
    if min(arr.shape) < 1:
        raise ImageReadError(path, f"empty image (shape {arr.shape})")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- DICOM

def _dicom_pixels(ds, path: str, hu_slope, hu_intercept) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "no pixel data")
    arr = ds.pixel_array  # raises for truncated data / unsupported transfer syntax
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if spp > 1:
        # colour (secondary capture, rare): convert to luminance
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, photometric, "RGB")
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        arr = apply_color_lut(arr, ds).astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                       np.float32)
    arr = arr.astype(np.float32)
    rescaled = True
    if hu_slope is not None or hu_intercept is not None:
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept)
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        rescaled = slope != 1 or inter != 0
        if rescaled:
            arr = arr * np.float32(slope) + np.float32(inter)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 0) or 0)
        if bits and not rescaled and spp == 1 and int(ds.get("PixelRepresentation", 0)) == 0:
            arr = np.float32(2 ** bits - 1) - arr  # full stored range, independent of content
        else:
            arr = arr.max() + arr.min() - arr
    return arr


def _dicom_modality(ds, nframes: int) -> str:
    mod = str(ds.get("Modality", "")).upper()
    if mod in _XRAY_MODALITIES:
        return "cxr"
    if mod == "CT":
        return "ct"
    return "ct" if nframes > 1 else "cxr"


def _read_dicom_file(path, hu_slope, hu_intercept):
    import pydicom
    ds = pydicom.dcmread(path)
    arr = _dicom_pixels(ds, path, hu_slope, hu_intercept)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 and arr.ndim == 3 and arr.shape[0] != 1:
        raise ImageReadError(path, f"unexpected pixel array shape {arr.shape}")
    arr = arr.reshape((frames,) + arr.shape[-2:])
    dy, dx = _pixel_spacing(ds)
    dz = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
    return arr, (dz, dy, dx), _dicom_modality(ds, frames)


def _pixel_spacing(ds) -> tuple[float, float]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(key)
        if v is not None and len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0:
            return float(v[0]), float(v[1])
    try:  # enhanced multi-frame: shared functional groups
        v = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(v[0]), float(v[1])
    except Exception:
        return 1.0, 1.0


def _read_dicom_series(folder, hu_slope, hu_intercept):
    import pydicom
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise ImageReadError(folder, "empty DICOM series folder")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as e:
            raise ImageReadError(folder, f"slice {os.path.basename(f)}: {_reason(e)}") from None
        if "PixelData" not in ds:
            continue  # e.g. a DICOMDIR or a structured report inside the folder
        slices.append(ds)
    if not slices:
        raise ImageReadError(folder, "no pixel data in the series folder")
    uids = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:
        raise ImageReadError(folder, f"folder holds {len(uids)} series, expected one")
    iop = slices[0].get("ImageOrientationPatient")
    if iop is not None and all("ImagePositionPatient" in s for s in slices):
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        pos = np.array([float(np.dot(normal, np.asarray(s.ImagePositionPatient, float)))
                        for s in slices])
    else:
        pos = np.array([float(s.get("InstanceNumber", i)) for i, s in enumerate(slices)])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    planes = [_dicom_pixels(s, folder, hu_slope, hu_intercept) for s in slices]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ImageReadError(folder, f"slices of different sizes {sorted(shapes)}")
    arr = np.stack([p.reshape(p.shape[-2:]) for p in planes])
    dy, dx = _pixel_spacing(slices[0])
    if len(pos) > 1 and np.ptp(pos) > 0:
        dz = float(np.median(np.abs(np.diff(pos))))
    else:
        dz = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    if iop is not None and len(slices) > 1:
        # [slice, row, column] -> voxel axes (i = along the row cosine, j = column cosine, k = normal)
        arr, (dz, dy, dx) = _to_canonical(arr.transpose(2, 1, 0), _iop_affine(iop, (dx, dy, dz)),
                                          (dx, dy, dz))
    return arr, (dz, dy, dx), "ct" if len(slices) > 1 else _dicom_modality(slices[0], 1)


# ---------------------------------------------------------------- NIfTI

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


def _read_nifti(path, hu_slope, hu_intercept, orientation):
    import nibabel as nib
    img = nib.load(path)
    shape = img.shape
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise ImageReadError(path, f"4D data (shape {tuple(shape)}) is not supported")
    if hu_slope is not None or hu_intercept is not None:
        arr = np.asanyarray(img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled")
                            else img.dataobj).astype(np.float32)
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept)
    else:
        slope, inter = img.dataobj.slope, img.dataobj.inter
        raw_ok = np.issubdtype(img.get_data_dtype(), np.integer) and slope in (1, None) \
            and inter in (0, None)
        # integer voxels stay integer through the reorientation (half the memory traffic)
        arr = np.asanyarray(img.dataobj) if raw_ok else img.get_fdata(dtype=np.float32)
    arr = arr.reshape(shape[:3] if len(shape) >= 3 else shape)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - len(shape[:3]))
    if orientation is not None:
        aff = _iop_affine(orientation, zooms)
    else:
        aff = img.affine
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

def _read_npy(path, hu_slope, hu_intercept):
    if path.lower().endswith(".npz"):  # RAD-ChestCT: one array per file (key "ct" if present)
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise ImageReadError(path, "empty .npz archive")
            arr = z["ct"] if "ct" in z.files else z[z.files[0]]
    else:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim not in (2, 3):
        raise ImageReadError(path, f"expected 2D or 3D data, got {arr.ndim}D shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ImageReadError(path, f"unsupported dtype {arr.dtype}")
    arr = np.asarray(arr, np.float32)
    if hu_slope is not None or hu_intercept is not None:
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept)
    if arr.ndim == 2:
        arr = arr[None]
    return arr, (1.0, 1.0, 1.0), "ct" if arr.shape[0] > 1 else "cxr"


def _read_raster(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()  # decodes fully: a truncated file raises here
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
        elif im.mode in ("L", "F"):
            arr = np.asarray(im, dtype=np.float32)
        else:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    return arr[None], (1.0, 1.0, 1.0), "cxr"


_READERS = {
    "dicom": lambda p, s, i, o: _read_dicom_file(p, s, i),
    "dicom-series": lambda p, s, i, o: _read_dicom_series(p, s, i),
    "nifti": _read_nifti,
    "npy": lambda p, s, i, o: _read_npy(p, s, i),
    "npz": lambda p, s, i, o: _read_npy(p, s, i),
    "png": lambda p, s, i, o: _read_raster(p),
    "jpg": lambda p, s, i, o: _read_raster(p),
}
