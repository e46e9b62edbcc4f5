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
import logging
import math
import os
import threading
import warnings
from typing import NamedTuple, Sequence

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
    array: np.ndarray                    # float32 [Z, H, W]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    modality: str                        # "cxr" | "ct"
    source: str


_NIFTI = (".nii", ".nii.gz")
_RASTER = (".png", ".jpg", ".jpeg")
_XRAY_MODALITIES = {"CR", "DX", "DR", "RG", "MG", "XA", "RF", "PX", "IO"}
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT"}


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


def load_image(path, *, modality: str | None = None,
               spacing: Sequence[float] | None = None,
               hu_slope: float | None = None, hu_intercept: float | None = None,
               orientation: Sequence[float] | None = None,
               max_voxels: int | None = None) -> ImageRecord:
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


# ---------------------------------------------------------------- DICOM

_READING = threading.local()


@contextlib.contextmanager
def _reading():
    """Marks this thread as inside :func:`load_image` (for :class:`_NoHeaderValues`)."""
    _READING.depth = getattr(_READING, "depth", 0) + 1
    try:
        yield
    finally:
        _READING.depth -= 1


class _NoHeaderValues(logging.Filter):
    """pydicom's log records quote element values (``Invalid value for VR DS: '<value>'``) and
    carry tracebacks. Inside :func:`load_image` they are dropped (the file is reported by name
    and category through ImageReadError); elsewhere those below ERROR are dropped and the rest
    keep their level with a fixed text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or getattr(_READING, "depth", 0):
            return False
        record.msg = "pydicom reported an error (its text is withheld: it may quote header values)"
        record.args = ()
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_PYDICOM = []


def _pydicom():
    """Imports pydicom once per process with its logging and warnings made identifier-safe."""
    import pydicom
    if not _PYDICOM:
        import pydicom.pixels  # noqa: F401  (creates the pixel decoders' loggers)
        flt = _NoHeaderValues()
        # logger filters do not see records propagated from child loggers: filter each of them
        for name in ["pydicom"] + [n for n in list(logging.root.manager.loggerDict)
                                   if n.startswith("pydicom.")]:
            lg = logging.getLogger(name)
            if not any(isinstance(f, _NoHeaderValues) for f in lg.filters):
                lg.addFilter(flt)
        # load_image's catch_warnings is per call and not thread-safe; this one is permanent
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        _PYDICOM.append(True)
    return pydicom


def _numbers(ds, path: str, keyword: str, count: int = 1) -> tuple[float, ...] | None:
    """The ``count`` finite numbers of tag ``keyword``, or ``None`` when absent or empty. Errors
    name the tag, never its value (identifier text lands in numeric tags in real archives)."""
    try:
        v = ds.get(keyword)  # pydicom converts on access: a non-numeric DS/IS raises here
        if v is None or (isinstance(v, (str, bytes)) and not v.strip()):
            return None
        vals = [v] if isinstance(v, (str, bytes, int, float)) else list(v)
        out = tuple(float(x) for x in vals)
    except Exception:
        raise ImageReadError(path, f"non-numeric {keyword}") from None
    if len(out) != count:
        raise ImageReadError(path, f"bad {keyword} (expected {count} value{'s' * (count > 1)})")
    if not all(math.isfinite(x) for x in out):
        raise ImageReadError(path, f"non-finite {keyword}")
    return out


def _dicom_size_check(ds, path: str, max_voxels: int, frames: int = 1) -> None:
    """Rows x Columns x frames x samples against the limit, before the decoder allocates."""
    dims = []
    for key in ("Rows", "Columns", "SamplesPerPixel"):
        v = _numbers(ds, path, key)
        dims.append(1 if v is None and key == "SamplesPerPixel" else (0 if v is None else v[0]))
    _check_size(path, dims + [frames], max_voxels)


def _dicom_frames(ds, path: str) -> int:
    v = _numbers(ds, path, "NumberOfFrames")
    if v is None or v[0] == 0:  # absent or 0: a single frame (0 is written by some exporters)
        return 1
    if v[0] < 0 or v[0] != int(v[0]):
        raise ImageReadError(path, "bad NumberOfFrames")
    return int(v[0])


def _dicom_pixels(ds, path: str, hu_slope, hu_intercept, max_voxels: int, frames: int = 1,
                  xray: bool = False) -> np.ndarray:
    """Stored pixels -> the modality's units: the modality LUT (a Modality LUT Sequence, else
    rescale slope/intercept, unless the manifest overrides them); for an X-ray (``xray``) then
    the first VOI LUT or window when the file has one (radiographs from hospital archives often
    store raw detector values that only the VOI makes readable); MONOCHROME1 inverted last."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"
                      ).strip().upper()
    if photometric not in _PHOTOMETRIC:
        raise ImageReadError(path, "unsupported PhotometricInterpretation")
    _dicom_size_check(ds, path, max_voxels, frames)
    spp = int((_numbers(ds, path, "SamplesPerPixel") or (1,))[0] or 1)
    # the rescale is parsed before decoding: a bad tag is named without paying for the decode
    if hu_slope is None and hu_intercept is None:
        # 0 stands for "not set" in some exporters (a zero slope would erase the image)
        slope = (_numbers(ds, path, "RescaleSlope") or (1.0,))[0] or 1.0
        inter = (_numbers(ds, path, "RescaleIntercept") or (0.0,))[0]
    else:
        slope = 1.0 if hu_slope is None else float(hu_slope)
        inter = 0.0 if hu_intercept is None else float(hu_intercept)
    with file_errors(path, "pixel data decoding"):
        arr = ds.pixel_array  # raises for truncated data / unsupported transfer syntax
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
    mono = spp == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")
    if mono and hu_slope is None and hu_intercept is None and _has_item(ds, path, "ModalityLUTSequence"):
        with file_errors(path, "modality LUT"):
            from pydicom.pixels import apply_modality_lut
            arr = apply_modality_lut(arr, ds)   # a lookup table: integer input, not floats
        rescaled = True
    else:
        arr = arr.astype(np.float32)
        rescaled = hu_slope is not None or hu_intercept is not None or slope != 1 or inter != 0
        if rescaled:
            arr = arr * np.float32(slope) + np.float32(inter)
    if xray and mono and (_has_item(ds, path, "VOILUTSequence")
                          or ("WindowCenter" in ds and "WindowWidth" in ds)):
        with file_errors(path, "VOI LUT"):
            from pydicom.pixels import apply_voi_lut
            if _has_item(ds, path, "VOILUTSequence") and np.all(np.mod(arr, 1) == 0):
                arr = arr.astype(np.int64)       # the LUT indexes integer values
            arr = apply_voi_lut(arr, ds, index=0)
        rescaled = True   # the VOI's output range is not the stored bits' range
    arr = np.asarray(arr, np.float32)
    if photometric == "MONOCHROME1":
        bits = int((_numbers(ds, path, "BitsStored") or (0,))[0])
        signed = int((_numbers(ds, path, "PixelRepresentation") or (0,))[0])
        if bits and not rescaled and spp == 1 and signed == 0:
            arr = np.float32(2 ** bits - 1) - arr  # full stored range, independent of content
        else:
            arr = arr.max() + arr.min() - arr
    return arr


def _has_item(ds, path: str, keyword: str) -> bool:
    """A sequence ``keyword`` with at least one item (an empty one counts as absent)."""
    try:
        return bool(ds.get(keyword))
    except Exception:
        raise ImageReadError(path, f"unreadable {keyword}") from None


def _dicom_modality(ds, nframes: int) -> str:
    mod = str(ds.get("Modality", "")).upper()
    if mod in _XRAY_MODALITIES:
        return "cxr"
    if mod == "CT":
        return "ct"
    return "ct" if nframes > 1 else "cxr"


def _read_dicom_file(path, hu_slope, hu_intercept, max_voxels):
    pydicom = _pydicom()
    with file_errors(path, "DICOM parsing"):
        ds = pydicom.dcmread(path)
    frames = _dicom_frames(ds, path)
    arr = _dicom_pixels(ds, path, hu_slope, hu_intercept, max_voxels, frames,
                        xray=frames == 1 and _dicom_modality(ds, frames) == "cxr")
    if arr.size != frames * arr.shape[-1] * arr.shape[-2]:
        raise ImageReadError(path, "pixel data does not match NumberOfFrames")
    arr = arr.reshape((frames,) + arr.shape[-2:])
    dy, dx = _pixel_spacing(ds, path)
    return arr, (_slice_spacing(ds, path), dy, dx), _dicom_modality(ds, frames)


def _slice_spacing(ds, path: str) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 1 mm. 0 counts as absent (2D images
    often carry SliceThickness 0); negative or non-finite values are refused by tag name."""
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        v = _numbers(ds, path, key)
        if v is None or v[0] == 0:
            continue
        if v[0] < 0:
            raise ImageReadError(path, f"non-positive {key}")
        return v[0]
    return 1.0


def _spacing_pair(ds, path: str, key: str) -> tuple[float, float] | None:
    """(row, column) spacing of ``key``; ``None`` when absent or zero (radiographs write
    PixelSpacing ``0\\0`` beside a real ImagerPixelSpacing); negative or non-finite is refused."""
    v = _numbers(ds, path, key, 2)
    if v is None or 0 in v:
        return None
    if min(v) < 0:
        raise ImageReadError(path, f"non-positive {key}")
    return v


def _pixel_spacing(ds, path: str) -> tuple[float, float]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        v = _spacing_pair(ds, path, key)
        if v is not None:
            return v
    try:  # enhanced multi-frame: shared functional groups
        item = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return 1.0, 1.0
    return _spacing_pair(item, path, "PixelSpacing") or (1.0, 1.0)


def _read_dicom_series(folder, hu_slope, hu_intercept, max_voxels):
    pydicom = _pydicom()
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise ImageReadError(folder, "empty DICOM series folder")
    slices = []
    for f in files:
        with file_errors(folder, f"DICOM parsing of slice {os.path.basename(f)}"):
            ds = pydicom.dcmread(f)
        if "PixelData" not in ds:
            continue  # e.g. a DICOMDIR or a structured report inside the folder
        slices.append(ds)
    if not slices:
        raise ImageReadError(folder, "no pixel data in the series folder")
    uids = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:
        raise ImageReadError(folder, f"folder holds {len(uids)} series, expected one")
    # the whole stack against the limit before any slice is decoded
    _check_size(folder, [sum(int((_numbers(s, folder, "Rows") or (0,))[0])
                             * int((_numbers(s, folder, "Columns") or (0,))[0]) for s in slices)],
                max_voxels, "series")
    iop = _numbers(slices[0], folder, "ImageOrientationPatient", 6)
    if iop is not None and all("ImagePositionPatient" in s for s in slices):
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        pos = np.array([float(np.dot(normal, _numbers(s, folder, "ImagePositionPatient", 3)))
                        for s in slices])
    else:
        pos = np.array([(_numbers(s, folder, "InstanceNumber") or (float(i),))[0]
                        for i, s in enumerate(slices)])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    planes = [_dicom_pixels(s, folder, hu_slope, hu_intercept, max_voxels) for s in slices]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ImageReadError(folder, "slices of different sizes")
    arr = np.stack([p.reshape(p.shape[-2:]) for p in planes])
    dy, dx = _pixel_spacing(slices[0], folder)
    if len(pos) > 1 and np.ptp(pos) > 0:
        dz = float(np.median(np.abs(np.diff(pos))))
        if not dz > 0:  # most slices share a position: no usable slice spacing
            raise ImageReadError(folder, "duplicate slice positions")
    else:
        dz = _slice_spacing(slices[0], folder)
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


def _read_nifti(path, hu_slope, hu_intercept, orientation, max_voxels):
    import nibabel as nib
    with file_errors(path, "NIfTI header parsing"):
        img = nib.load(path)  # the header only; voxels are read below
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise ImageReadError(path, f"{len(shape)}D data is not supported")
    _check_size(path, shape, max_voxels)
    if hu_slope is not None or hu_intercept is not None:
        arr = np.asanyarray(img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled")
                            else img.dataobj).astype(np.float32)
        arr = arr * np.float32(1.0 if hu_slope is None else hu_slope) + np.float32(
            0.0 if hu_intercept is None else hu_intercept)
    else:
        slope, inter = img.dataobj.slope, img.dataobj.inter
        for name, v in (("scl_slope", slope), ("scl_inter", inter)):
            if v is not None and not np.isfinite(v):
                raise ImageReadError(path, f"non-finite {name}")
        raw_ok = np.issubdtype(img.get_data_dtype(), np.integer) and slope in (1, None) \
            and inter in (0, None)
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
            0.0 if hu_intercept is None else hu_intercept)
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


# every reader: (path, hu_slope, hu_intercept, orientation, max_voxels)
#   -> (array, spacing, modality)
_READERS = {
    "dicom": lambda p, s, i, o, m: _read_dicom_file(p, s, i, m),
    "dicom-series": lambda p, s, i, o, m: _read_dicom_series(p, s, i, m),
    "nifti": _read_nifti,
    "npy": lambda p, s, i, o, m: _read_npy(p, s, i, m),
    "npz": lambda p, s, i, o, m: _read_npy(p, s, i, m),
    "png": lambda p, s, i, o, m: _read_raster(p, m),
    "jpg": lambda p, s, i, o, m: _read_raster(p, m),
}
