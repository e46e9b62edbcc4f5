"""DICOM files and series -> ``(array, spacing, modality)`` for :func:`mmv_jax.data.readers.load_image`.

pydicom is imported once with its logging and warnings made identifier-safe (:func:`_pydicom`):
its records quote element values, so inside ``load_image`` they are dropped and elsewhere reduced
to a fixed text. Sizes a header claims are checked before any pixel is decoded; spacing and
rescale values must be finite; errors are fixed categories plus a tag name.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import numpy as np

from mmv_jax.data.readers import (
    _READING,
    ImageReadError,
    _check_size,
    _iop_affine,
    _to_canonical,
    file_errors,
)

_XRAY_MODALITIES = {"CR", "DX", "DR", "RG", "MG", "XA", "RF", "PX", "IO"}
_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
    "YBR_ICT",
    "YBR_RCT",
}


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
        for name in ["pydicom"] + [
            n for n in list(logging.root.manager.loggerDict) if n.startswith("pydicom.")
        ]:
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


def _dicom_pixels(
    ds, path: str, hu_slope, hu_intercept, max_voxels: int, frames: int = 1, xray: bool = False
) -> np.ndarray:
    """Stored pixels -> the modality's units: the modality LUT (a Modality LUT Sequence, else
    rescale slope/intercept, unless the manifest overrides them); for an X-ray (``xray``) then
    the first VOI LUT or window when the file has one (radiographs from hospital archives often
    store raw detector values that only the VOI makes readable); MONOCHROME1 inverted last."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "no pixel data")
    photometric = (
        str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    )
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

        arr = apply_color_lut(arr, ds).astype(np.float32) @ np.array(
            [0.299, 0.587, 0.114], np.float32
        )
    mono = spp == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")
    if (
        mono
        and hu_slope is None
        and hu_intercept is None
        and _has_item(ds, path, "ModalityLUTSequence")
    ):
        with file_errors(path, "modality LUT"):
            from pydicom.pixels import apply_modality_lut

            arr = apply_modality_lut(arr, ds)  # a lookup table: integer input, not floats
        rescaled = True
    else:
        arr = arr.astype(np.float32)
        rescaled = hu_slope is not None or hu_intercept is not None or slope != 1 or inter != 0
        if rescaled:
            arr = arr * np.float32(slope) + np.float32(inter)
    if (
        xray
        and mono
        and (
            _has_item(ds, path, "VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds)
        )
    ):
        with file_errors(path, "VOI LUT"):
            from pydicom.pixels import apply_voi_lut

            if _has_item(ds, path, "VOILUTSequence") and np.all(np.mod(arr, 1) == 0):
                arr = arr.astype(np.int64)  # the LUT indexes integer values
            arr = apply_voi_lut(arr, ds, index=0)
        rescaled = True  # the VOI's output range is not the stored bits' range
    arr = np.asarray(arr, np.float32)
    if photometric == "MONOCHROME1":
        bits = int((_numbers(ds, path, "BitsStored") or (0,))[0])
        signed = int((_numbers(ds, path, "PixelRepresentation") or (0,))[0])
        if bits and not rescaled and spp == 1 and signed == 0:
            arr = np.float32(2**bits - 1) - arr  # full stored range, independent of content
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


def read_file(path, hu_slope, hu_intercept, max_voxels):
    pydicom = _pydicom()
    with file_errors(path, "DICOM parsing"):
        ds = pydicom.dcmread(path)
    frames = _dicom_frames(ds, path)
    arr = _dicom_pixels(
        ds,
        path,
        hu_slope,
        hu_intercept,
        max_voxels,
        frames,
        xray=frames == 1 and _dicom_modality(ds, frames) == "cxr",
    )
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


def read_series(folder, hu_slope, hu_intercept, max_voxels):
    pydicom = _pydicom()
    files = sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
    )
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
    _check_size(
        folder,
        [
            sum(
                int((_numbers(s, folder, "Rows") or (0,))[0])
                * int((_numbers(s, folder, "Columns") or (0,))[0])
                for s in slices
            )
        ],
        max_voxels,
        "series",
    )
    iop = _numbers(slices[0], folder, "ImageOrientationPatient", 6)
    if iop is not None and all("ImagePositionPatient" in s for s in slices):
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        pos = np.array(
            [float(np.dot(normal, _numbers(s, folder, "ImagePositionPatient", 3))) for s in slices]
        )
    else:
        pos = np.array(
            [
                (_numbers(s, folder, "InstanceNumber") or (float(i),))[0]
                for i, s in enumerate(slices)
            ]
        )
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
        arr, (dz, dy, dx) = _to_canonical(
            arr.transpose(2, 1, 0), _iop_affine(iop, (dx, dy, dz)), (dx, dy, dz)
        )
    return arr, (dz, dy, dx), "ct" if len(slices) > 1 else _dicom_modality(slices[0], 1)


# ---------------------------------------------------------------- NIfTI
