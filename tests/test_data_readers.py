"""Readers on real files shipped with pydicom / pydicom-data / nibabel (tests/test_data_readers.py)."""

import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mmv_jax.data.readers import ImageReadError, load_image


def _f(name):
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"{name} not shipped")
    return p


@pytest.mark.parametrize(
    "a,b",
    [
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),  # MONOCHROME1 chest radiograph, JPEG 2000 lossless
        ("RG1_UNCI.dcm", "RG1_J2KI.dcm"),  # ... JPEG 2000 lossy vs its decoded reference
        ("693_UNCR.dcm", "693_J2KR.dcm"),  # CT, JPEG 2000 lossless
        ("MR_small.dcm", "MR_small_RLE.dcm"),  # RLE
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),  # JPEG-LS
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"),  # multi-frame
        ("emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
    ],
)
def test_encodings_decode_to_same_pixels(a, b):
    ra, rb = load_image(_f(a)), load_image(_f(b))
    assert ra.array.dtype == np.float32 and ra.array.ndim == 3
    assert ra.array.shape == rb.array.shape
    if "J2KI" in b:  # lossy: the UNCI file is the decoded reference; allow codec rounding
        assert np.abs(ra.array - rb.array).max() <= 2
    else:
        np.testing.assert_array_equal(ra.array, rb.array)
    assert ra.spacing == rb.spacing


def test_jpeg_baseline_and_lossless_decode():
    r = load_image(_f("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline (colour -> luminance)
    assert r.array.shape == (1, 100, 100) and np.isfinite(r.array).all()
    r = load_image(_f("JPEG-LL.dcm"))  # JPEG lossless, process 14
    assert r.array.shape == (1, 1024, 256) and r.array.max() > 0


def test_multiframe_is_a_volume():
    r = load_image(_f("emri_small_RLE.dcm"))
    assert r.array.shape == (10, 64, 64)


def test_monochrome1_inverted_bone_bright():
    path = _f("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float32)
    r = load_image(path)
    assert r.modality == "cxr" and r.array.shape == (1,) + raw.shape
    # the file's window (a CR from an archive) first, then the inversion
    from pydicom.pixels import apply_voi_lut

    voi = apply_voi_lut(ds.pixel_array, ds).astype(np.float32)
    np.testing.assert_allclose(r.array[0], voi.max() + voi.min() - voi, rtol=1e-6)
    # bone (the spine, image centre column band) brighter than the lung fields beside it
    h, w = raw.shape
    centre = r.array[0, h // 3 : 2 * h // 3, w // 2 - w // 40 : w // 2 + w // 40].mean()
    lung = r.array[0, h // 3 : 2 * h // 3, w // 4 - w // 20 : w // 4 + w // 20].mean()
    assert centre > lung


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KR.dcm"])
def test_ct_in_hounsfield_units(name):
    path = _f(name)
    ds = pydicom.dcmread(path)
    r = load_image(path)
    assert r.modality == "ct"
    expect = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(r.array[0], expect)
    assert r.array.min() < -500 and r.array.max() < 4000  # air in HU, not raw stored values
    assert r.spacing[1:] == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))


def test_manifest_overrides_rescale():
    r = load_image(_f("CT_small.dcm"), hu_slope=2.0, hu_intercept=-10.0)
    raw = pydicom.dcmread(_f("CT_small.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(r.array[0], raw * 2 - 10)


def test_truncated_dicom_raises(tmp_path):
    src = _f("RG1_UNCR.dcm")
    data = open(src, "rb").read()
    bad = tmp_path / "trunc.dcm"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as e:
        load_image(bad)
    assert str(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_error_names_no_patient(tmp_path):
    ds = pydicom.dcmread(_f("CT_small.dcm"))
    ds.PatientName = "Secret^Person"
    ds.PatientID = "SECRET-ID-123"
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    p = tmp_path / "x.dcm"
    ds.save_as(p)
    with pytest.raises(ImageReadError) as e:
        load_image(p)
    msg = str(e.value)
    assert "Secret" not in msg and "SECRET-ID" not in msg and str(p) in msg


@pytest.mark.parametrize(
    "name,reason",
    [("emri_small_jpeg_2k_lossless_too_short.dcm", None), ("rtplan.dcm", "no pixel data")],
)
def test_bad_dicoms(name, reason):
    with pytest.raises(ImageReadError, match=reason):
        load_image(_f(name))


def test_missing_and_zero_byte(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "nope.dcm")
    z = tmp_path / "zero.nii.gz"
    z.write_bytes(b"")
    with pytest.raises(ImageReadError, match="zero-byte"):
        load_image(z)


def test_dicom_series_folder_sorted_by_position(tmp_path):
    ds = pydicom.dcmread(_f("CT_small.dcm"))
    base = ds.pixel_array
    order = [3, 0, 4, 1, 2]
    for k, z in enumerate(order):  # files written out of order; InstanceNumber misleading
        s = pydicom.dcmread(_f("CT_small.dcm"))
        s.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        s.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        s.InstanceNumber = k + 1
        s.PixelData = (base + z).astype(base.dtype).tobytes()
        s.save_as(tmp_path / f"slice{k}.dcm")
    r = load_image(tmp_path)
    assert r.array.shape == (5, 128, 128) and r.modality == "ct" and r.source == "dicom-series"
    assert r.spacing[0] == pytest.approx(2.5)
    slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    for z in range(5):
        np.testing.assert_array_equal(r.array[z], (base + z) * slope + inter)


# ---------------------------------------------------------------- NIfTI


def _nib(name):
    import nibabel

    p = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", name)
    if not os.path.exists(p):
        pytest.skip(f"{name} not shipped")
    return p


def test_nifti_shipped_anatomical():
    import nibabel as nib

    p = _nib("anatomical.nii")
    img = nib.load(p)
    r = load_image(p)
    assert r.array.dtype == np.float32 and r.array.ndim == 3
    canon = nib.as_closest_canonical(img)
    data = canon.get_fdata(dtype=np.float32)
    np.testing.assert_allclose(r.array, data[::-1, ::-1, :].transpose(2, 1, 0))
    zx, zy, zz = canon.header.get_zooms()[:3]
    assert r.spacing == pytest.approx((zz, zy, zx))


def test_nifti_shipped_4d_raises():
    with pytest.raises(ImageReadError, match="4D"):
        load_image(_nib("example4d.nii.gz"))


def test_nifti_reorientation_and_overrides(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    canon = rng.normal(size=(6, 7, 8)).astype(np.float32)  # [z I->S, y A->P, x R->L]
    # store as voxels (i, j, k) = (x R->L, y A->P, z I->S) = LPS, spacing 2, 3, 4
    data = canon.transpose(2, 1, 0)
    img = nib.Nifti1Image(data, np.diag([-2.0, -3.0, 4.0, 1.0]))
    nib.save(img, tmp_path / "lps.nii.gz")
    r = load_image(tmp_path / "lps.nii.gz")
    np.testing.assert_allclose(r.array, canon, rtol=1e-6)
    assert r.spacing == pytest.approx((4.0, 3.0, 2.0)) and r.modality == "ct"
    # a header without orientation (CT-RATE): orientation + spacing + rescale from the manifest
    raw = nib.Nifti1Image(np.round(data * 100).astype(np.int16), np.eye(4))
    nib.save(raw, tmp_path / "raw.nii.gz")
    r2 = load_image(
        tmp_path / "raw.nii.gz",
        orientation=[1, 0, 0, 0, 1, 0],
        spacing=[4.0, 3.0, 2.0],
        hu_slope=1.0,
        hu_intercept=-1024.0,
    )
    np.testing.assert_allclose(r2.array, np.round(canon * 100) - 1024)
    assert r2.spacing == (4.0, 3.0, 2.0)


def test_nifti_truncated_and_nan(tmp_path):
    import nibabel as nib

    src = _nib("standard.nii.gz")
    data = open(src, "rb").read()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "t.nii.gz")
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(ImageReadError, match="NaN"):
        load_image(tmp_path / "nan.nii")


def test_png_jpg_npy(tmp_path):
    from PIL import Image

    img = (np.arange(40 * 30) % 251).reshape(40, 30).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    r = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(r.array[0], img)
    assert r.modality == "cxr"
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg").array.shape == (1, 40, 30)
    raw = open(tmp_path / "a.png", "rb").read()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "t.png")
    np.save(tmp_path / "v.npy", np.ones((3, 4, 5), np.int16))
    r = load_image(tmp_path / "v.npy", spacing=[2, 1, 1])
    assert r.array.shape == (3, 4, 5) and r.modality == "ct" and r.spacing == (2.0, 1.0, 1.0)
    np.save(tmp_path / "e.npy", np.ones((0, 4), np.float32))
    with pytest.raises(ImageReadError, match="empty"):
        load_image(tmp_path / "e.npy")
    np.save(tmp_path / "f.npy", np.ones((2, 3, 4, 5), np.float32))
    with pytest.raises(ImageReadError, match="4D"):
        load_image(tmp_path / "f.npy")


def test_coronal_dicom_series_reoriented(tmp_path):
    ds = pydicom.dcmread(_f("CT_small.dcm"))
    base = ds.pixel_array
    for s in range(4):  # coronal: rows run superior -> inferior, slices anterior -> posterior
        sl = pydicom.dcmread(_f("CT_small.dcm"))
        sl.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        sl.ImagePositionPatient = [0.0, 3.0 * s, 0.0]
        sl.PixelData = (base + s).astype(base.dtype).tobytes()
        sl.save_as(tmp_path / f"c{s}.dcm")
    r = load_image(tmp_path)
    slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    stack = np.stack([(base + s) * slope + inter for s in range(4)])  # [A->P, S->I, R->L]
    expect = stack.transpose(1, 0, 2)[::-1]  # [I->S, A->P, R->L]
    np.testing.assert_array_equal(r.array, expect)
    px = float(ds.PixelSpacing[0])
    assert r.spacing == pytest.approx((px, 3.0, float(ds.PixelSpacing[1])))


# ---------------------------------------------------------------- modality LUT and VOI LUT / window


def _cxr_dicom(path, px, **tags):
    """A single-frame DX written with pydicom; ``tags`` set on the dataset (window, VOI LUT ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = "Secret^Person", "SECRET-ID-123"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = px.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def _ramp():
    return np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (48, 1))


def test_window_applied_to_xray(tmp_path):
    px = _ramp()
    plain = load_image(_cxr_dicom(tmp_path / "plain.dcm", px))
    np.testing.assert_array_equal(plain.array[0], px.astype(np.float32))  # no window: raw
    path = _cxr_dicom(tmp_path / "win.dcm", px, WindowCenter="1000", WindowWidth="800")
    r = load_image(path)
    ds = pydicom.dcmread(path)
    from pydicom.pixels import apply_voi_lut

    np.testing.assert_allclose(r.array[0], apply_voi_lut(px, ds).astype(np.float32))
    # LINEAR window 600..1400 onto the 12-bit range: saturated outside, a ramp inside
    row = r.array[0, 0]
    assert row[px[0] <= 590].max() == 0 and row[px[0] >= 1410].min() == 4095
    inside = (px[0] > 610) & (px[0] < 1390)
    assert inside.sum() >= 10 and np.all(np.diff(row[inside]) > 0)
    # MONOCHROME1: the window first, then the inversion (bright = dense)
    m1 = load_image(
        _cxr_dicom(
            tmp_path / "m1.dcm",
            px,
            WindowCenter="1000",
            WindowWidth="800",
            PhotometricInterpretation="MONOCHROME1",
        )
    )
    np.testing.assert_allclose(m1.array[0], row.max() + row.min() - r.array[0])


def test_voi_lut_sequence_applied(tmp_path):
    """pydicom-data's vlut_04.dcm (VOI LUT Sequence) and one written here."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    src = _f("vlut_04.dcm")
    ds = pydicom.dcmread(src)
    want = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    r = load_image(src)
    assert r.modality == "cxr"
    np.testing.assert_array_equal(r.array[0], want)
    assert not np.array_equal(r.array[0], ds.pixel_array.astype(np.float32))

    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).round().astype(np.uint16)  # a gamma curve
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData; US (its VR is ambiguous: US or OW)
    px = _ramp()
    # the VOI LUT Sequence wins over a window in the same file (pydicom's prefer_lut)
    path = _cxr_dicom(
        tmp_path / "lut.dcm", px, VOILUTSequence=[item], WindowCenter="100", WindowWidth="10"
    )
    np.testing.assert_array_equal(load_image(path).array[0], lut[px].astype(np.float32))


def test_modality_lut_sequence_applied():
    from pydicom.pixels import apply_modality_lut

    src = _f("mlut_18.dcm")
    ds = pydicom.dcmread(src)
    assert ds.get("ModalityLUTSequence")
    r = load_image(src)
    np.testing.assert_array_equal(
        r.array[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    )


def test_bad_window_named_by_category_not_value(tmp_path):
    path = _cxr_dicom(tmp_path / "bad.dcm", _ramp(), WindowCenter="1000", WindowWidth="0")
    with pytest.raises(ImageReadError) as e:
        load_image(path)
    assert e.value.reason.startswith("VOI LUT failed") and str(path) in str(e.value)
    # identifier text in the wrong tag (pydicom refuses to write it: patch the file's bytes)
    path = _cxr_dicom(
        tmp_path / "bad2.dcm", _ramp(), WindowCenter="1000", WindowWidth="800.0000000001"
    )
    data = open(path, "rb").read()
    assert data.count(b"800.0000000001") == 1
    open(path, "wb").write(data.replace(b"800.0000000001", b"SECRET-ID-123 "))
    with pytest.raises(ImageReadError) as e:
        load_image(path)
    assert "SECRET" not in str(e.value) and "Secret" not in str(e.value)


def test_ct_ignores_window():
    """A CT keeps its HU: windows are display settings; the CT window is the config's."""
    path = _f("693_J2KR.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" in ds
    expect = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(load_image(path).array[0], expect)
