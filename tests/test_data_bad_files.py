"""Issue 20, per-file side: any broken file is one ImageReadError naming it (sizes checked before
allocating, NaN spacing refused), and no message, log line or cache file quotes a header value."""

import contextlib
import gzip
import json
import logging
import os
import pickle
import time
import traceback
import tracemalloc

import numpy as np
import pydicom
import pytest
from helpers import MRN, put_raw_tag
from pydicom.data import get_testdata_file

from mmv_jax.data import config as data_config, readers, transforms
from mmv_jax.data.manifest import ManifestError, load_manifest, parse_record
from mmv_jax.data.readers import DEFAULT_MAX_VOXELS, ImageReadError, file_errors, load_image
from mmv_jax.data.views import crop_shape


def _f(name):
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"{name} not shipped")
    return p


def _ct(tmp_path, name, **raw):
    ds = pydicom.dcmread(_f("CT_small.dcm"))
    del ds.SpacingBetweenSlices  # so that SliceThickness is the slice spacing read
    for k, v in raw.items():
        put_raw_tag(ds, k, v)
    p = tmp_path / name
    ds.save_as(p)
    return p


def _refused_fast(path, match, **kw):
    """load_image refuses ``path`` naming it and ``match``, in under 2 s and 32 MiB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageReadError) as e:
            load_image(path, **kw)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.path == str(path) and str(path) in str(e.value)
    assert match in e.value.reason, e.value.reason
    assert elapsed < 2.0, elapsed
    assert peak < 32 << 20, peak
    return e.value


# ---------------------------------------------------------------- sizes before allocation


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_header_claiming_30000_cubed_is_refused_before_reading(tmp_path, suffix):
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\0" * 4 + b"\0" * 4096  # header, no extension, a little data
    p = tmp_path / f"huge{suffix}"
    p.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    _refused_fast(p, "max_image_voxels")


def test_real_ct_size_is_admitted_by_default(tmp_path):
    """A header claiming 512 x 512 x 1000 passes the size check (then fails, as truncated)."""
    import nibabel as nib

    assert DEFAULT_MAX_VOXELS >= 512 * 512 * 1000
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 1000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    p = tmp_path / "ct.nii"
    p.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)
    with pytest.raises(ImageReadError) as e:
        load_image(p)
    assert "max_image_voxels" not in e.value.reason
    with pytest.raises(ImageReadError, match="max_image_voxels"):
        load_image(p, max_voxels=512 * 512 * 1000 - 1)


def test_rle_dicom_claiming_huge_frames_is_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(_f("emri_small_RLE.dcm"))  # RLE, 10 frames of 64 x 64
    ds.Rows = ds.Columns = 60000
    ds.NumberOfFrames = 2000  # 60000^2 x 2000 x 2 bytes = 13 TiB
    p = tmp_path / "huge_rle.dcm"
    ds.save_as(p)
    _refused_fast(p, "max_image_voxels")


def test_dicom_series_checked_as_a_whole(tmp_path):
    for z in range(3):
        s = pydicom.dcmread(_f("CT_small.dcm"))
        s.ImagePositionPatient = [0.0, 0.0, 2.0 * z]
        s.save_as(tmp_path / f"s{z}.dcm")
    assert load_image(tmp_path).array.shape == (3, 128, 128)
    with pytest.raises(ImageReadError, match="max_image_voxels"):
        load_image(tmp_path, max_voxels=3 * 128 * 128 - 1)


@pytest.mark.parametrize("fmt", ["png", "npy", "npz", "nii.gz", "dcm"])
def test_every_format_honours_max_voxels(tmp_path, fmt):
    from PIL import Image

    img = (np.arange(16 * 16) % 200).reshape(16, 16).astype(np.uint8)
    p = tmp_path / f"a.{fmt}"
    if fmt == "png":
        Image.fromarray(img).save(p)
    elif fmt == "npy":
        np.save(p, img)
    elif fmt == "npz":
        np.savez_compressed(p, ct=img)
    elif fmt == "nii.gz":
        import nibabel as nib

        nib.save(nib.Nifti1Image(img[:, :, None].astype(np.int16), np.eye(4)), p)
    else:
        p = tmp_path / "a.dcm"
        pydicom.dcmread(_f("CT_small.dcm")).save_as(p)  # 128 x 128
    n = 128 * 128 if fmt == "dcm" else 16 * 16
    assert load_image(p, max_voxels=n).array.size == n
    with pytest.raises(ImageReadError, match="max_image_voxels") as e:
        load_image(p, max_voxels=n - 1)
    assert e.value.path == str(p)


# ---------------------------------------------------------------- spacing and scaling


@pytest.mark.parametrize(
    "tag,value,reason",
    [
        ("SliceThickness", "nan", "non-finite SliceThickness"),
        ("SliceThickness", "-2.5", "non-positive SliceThickness"),
        ("PixelSpacing", "nan\\0.7", "non-finite PixelSpacing"),
        ("PixelSpacing", "inf\\inf", "non-finite PixelSpacing"),
        ("PixelSpacing", "0.7", "bad PixelSpacing"),
        ("RescaleSlope", "nan", "non-finite RescaleSlope"),
        ("RescaleSlope", "inf", "non-finite RescaleSlope"),
        ("RescaleIntercept", "-inf", "non-finite RescaleIntercept"),
        ("NumberOfFrames", "-3", "bad NumberOfFrames"),
    ],
)
def test_non_finite_spacing_or_scaling_refused_by_tag(tmp_path, tag, value, reason):
    p = _ct(tmp_path, "bad.dcm", **{tag: value})
    e = _refused_fast(p, reason)
    assert value not in e.reason


def test_nifti_bad_pixdim_refused_unless_manifest_overrides(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, np.nan, 0.0]
    nib.save(img, tmp_path / "z.nii")
    with pytest.raises(ImageReadError) as e:
        load_image(tmp_path / "z.nii", orientation=[1, 0, 0, 0, 1, 0])
    assert "spacing" in e.value.reason
    r = load_image(tmp_path / "z.nii", orientation=[1, 0, 0, 0, 1, 0], spacing=[2.0, 1.0, 1.0])
    assert r.spacing == (2.0, 1.0, 1.0)


def test_views_and_transforms_never_divide_by_zero():
    rng = np.random.default_rng(0)
    for dims in [(0, 20), (20, 0, 20)]:
        with pytest.raises(ValueError, match="side"):
            crop_shape(rng, dims, (0.3, 1.0))
    with pytest.raises(ValueError, match="scale"):
        crop_shape(rng, (28, 28), (float("nan"), 1.0))
    for spacing in [(float("nan"), 1, 1), (0, 1, 1), (1, -1, 1), (1, 1, float("inf"))]:
        with pytest.raises(ValueError, match="spacing"):
            transforms.target_shape((10, 20, 20), spacing, 112)
    assert crop_shape(rng, (5, 3), (0.05, 0.3)) == (5, 3)  # smaller than a patch: whole image


# ---------------------------------------------------------------- any exception: ImageReadError


class _Rec:
    def __init__(self, path, modality="ct", preprocessed=False):
        self.path, self.modality, self.preprocessed = str(path), modality, preprocessed

    def read_kwargs(self):
        return dict(modality=self.modality)


@pytest.mark.parametrize(
    "exc,reason",
    [
        (MemoryError, "preprocessing: out of memory"),
        (ZeroDivisionError, "preprocessing failed (ZeroDivisionError)"),
        (FloatingPointError, "preprocessing failed (FloatingPointError)"),
    ],
)
def test_load_preprocessed_turns_any_error_into_image_read_error(
    tmp_path, monkeypatch, exc, reason
):
    p = tmp_path / "v.npy"
    np.save(p, np.zeros((20, 20, 20), np.int16))
    rec = _Rec(p)
    out = transforms.load_preprocessed(rec, long_side_2d=56, long_side_3d=28)
    assert out.shape == (28, 28, 28) and out.dtype == np.float32

    def boom(*a, **k):
        raise exc(MRN)

    monkeypatch.setattr(transforms, "preprocess", boom)
    with pytest.raises(ImageReadError) as e:
        transforms.load_preprocessed(rec, long_side_2d=56, long_side_3d=28)
    assert e.value.path == str(p) and e.value.reason == reason
    assert MRN not in "".join(traceback.format_exception(e.value))


def test_load_preprocessed_checks_modality(tmp_path):
    p = tmp_path / "v.npy"
    np.save(p, np.zeros((20, 20, 20), np.int16))
    with pytest.raises(ImageReadError, match="manifest says cxr but the image is 3D"):
        transforms.load_preprocessed(_Rec(p, "cxr"), long_side_2d=56, long_side_3d=28)


@pytest.mark.parametrize("exc", [MemoryError, ZeroDivisionError, OverflowError, KeyError])
def test_reader_exceptions_become_image_read_error(tmp_path, monkeypatch, exc):
    p = tmp_path / "v.npy"
    np.save(p, np.zeros((2, 3, 3), np.int16))

    def boom(*a):
        raise exc(MRN)

    monkeypatch.setitem(readers._READERS, "npy", boom)
    with pytest.raises(ImageReadError) as e:
        load_image(p)
    assert e.value.path == str(p) and MRN not in str(e.value)
    assert e.value.reason.startswith("reading")


def test_file_errors_passes_interrupts_and_image_read_errors():
    with pytest.raises(KeyboardInterrupt):
        with file_errors("x", "reading"):
            raise KeyboardInterrupt
    inner = ImageReadError("y", "non-numeric RescaleSlope")
    with pytest.raises(ImageReadError) as e:
        with file_errors("x", "reading"):
            raise inner
    assert e.value is inner


def _rle_corrupted(tmp_path, start):
    ds = pydicom.dcmread(_f("MR_small_RLE.dcm"))
    data = bytearray(ds.PixelData)
    start = start if start >= 0 else len(data) // 2
    data[start : start + 256] = b"\xff" * 256
    ds.PixelData = bytes(data)
    p = tmp_path / f"rle{start}.dcm"
    ds.save_as(p)
    return p


def test_decoder_failures_are_quiet_and_named(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    p = _rle_corrupted(tmp_path, 64)  # the RLE header: every decoder plugin fails, pydicom logs
    with pytest.raises(ImageReadError, match="pixel data decoding failed"):
        load_image(p)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    # outside load_image the same records pass, reduced to a fixed text without traceback
    monkeypatch.setattr(readers, "_reading", contextlib.nullcontext)
    with pytest.raises(ImageReadError):
        load_image(p)
    recs = [r for r in caplog.records if r.name.startswith("pydicom")]
    assert recs and all(
        r.levelno >= logging.ERROR and r.exc_info is None and "withheld" in r.getMessage()
        for r in recs
    )


def test_rust_decoder_panic_is_a_bad_file(tmp_path):
    """pylibjpeg-rle panics on this frame (pyo3 PanicException, a BaseException)."""
    p = _rle_corrupted(tmp_path, -1)
    with pytest.raises(ImageReadError, match="pixel data decoding failed"):
        load_image(p)


def test_image_read_error_pickles():
    e = pickle.loads(pickle.dumps(ImageReadError("/a/b.dcm", "non-numeric RescaleSlope")))
    assert isinstance(e, ImageReadError) and e.path == "/a/b.dcm"
    assert e.reason == "non-numeric RescaleSlope" and str(e) == "/a/b.dcm: non-numeric RescaleSlope"


# ---------------------------------------------------------------- no identifier anywhere

_IDENT_TAGS = [
    "RescaleSlope",
    "RescaleIntercept",
    "NumberOfFrames",
    "PixelSpacing",
    "PhotometricInterpretation",
    "SliceThickness",
    "SamplesPerPixel",
]


def _identifier_files(tmp_path):
    files = {}
    for tag in _IDENT_TAGS:
        if tag == "SamplesPerPixel":  # US (binary): identifier text cannot sit there; skip
            continue
        files[tag] = _ct(tmp_path, f"{tag}.dcm", **{tag: MRN})
    # a series whose slice positions hold the identifier
    series = tmp_path / "series"
    series.mkdir()
    for z in range(2):
        s = pydicom.dcmread(_f("CT_small.dcm"))
        put_raw_tag(s, "ImagePositionPatient", f"0\\0\\{MRN}")
        s.save_as(series / f"s{z}.dcm")
    files["ImagePositionPatient"] = series
    return files


def test_identifier_in_parsed_tags_never_quoted(tmp_path, caplog, capfd, recwarn):
    caplog.set_level(logging.DEBUG)  # every logger, pydicom's included, at its most verbose
    logging.getLogger("pydicom").setLevel(logging.DEBUG)
    seen = []
    try:
        for tag, p in _identifier_files(tmp_path).items():
            with pytest.raises(ImageReadError) as e:
                load_image(p)
            assert e.value.path == str(p)
            assert tag in e.value.reason, (tag, e.value.reason)
            seen += [str(e.value), repr(e.value), "".join(traceback.format_exception(e.value))]
            logging.getLogger("mmv_jax.test").warning(
                "skipping bad file %s: %s", e.value.path, e.value.reason
            )
        # pydicom's own logger goes through the same filter, tracebacks included
        try:
            raise ValueError(MRN)
        except ValueError:
            logging.getLogger("pydicom").error("Invalid value %r", MRN, exc_info=True)
            logging.getLogger("pydicom.pixels.utils").warning("Invalid value %r", MRN)
    finally:
        logging.getLogger("pydicom").setLevel(logging.NOTSET)
    out, err = capfd.readouterr()
    seen += [caplog.text, out, err] + [str(w.message) for w in recwarn]
    assert "pydicom reported an error" in caplog.text
    for text in seen:
        assert "MRN-TEST" not in text


def test_cache_keeps_going_and_lists_bad_files_by_category(tmp_path):
    from mmv_jax.data.cache import build_cache

    (tmp_path / "in").mkdir()
    files = _identifier_files(tmp_path / "in")
    good = tmp_path / "in" / "good.npy"
    np.save(good, np.zeros((20, 30, 30), np.int16))
    huge = tmp_path / "in" / "huge.dcm"
    ds = pydicom.dcmread(_f("emri_small_RLE.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.NumberOfFrames = 2000
    ds.save_as(huge)
    paths = list(files.values()) + [huge, good]
    manifest = tmp_path / "in" / "m.jsonl"
    with open(manifest, "w") as f:
        for i, p in enumerate(paths):
            f.write(
                json.dumps(dict(id=f"r{i}", path=str(p), modality="ct", dataset="t", split="train"))
                + "\n"
            )
    res = build_cache(
        str(manifest),
        str(tmp_path / "out"),
        workers=1,
        long_side_2d=28,
        long_side_3d=28,
        progress=False,
    )
    assert res["images"] == 1 and res["bad"] == len(paths) - 1
    bad = [json.loads(line) for line in open(tmp_path / "out" / "bad.jsonl")]
    assert [b["path"] for b in bad] == [str(p) for p in paths[:-1]]
    reasons = {b["path"]: b["reason"] for b in bad}
    for tag, p in files.items():
        assert tag in reasons[str(p)]
    assert "max_image_voxels" in reasons[str(huge)]
    for root, _, names in os.walk(tmp_path / "out"):
        for n in names:
            assert MRN.encode() not in open(os.path.join(root, n), "rb").read(), n
    assert load_manifest(tmp_path / "out" / "manifest.jsonl")[0].preprocessed is True


# ---------------------------------------------------------------- manifest and config


def _obj(**kw):
    return dict(dict(id="a", path="a.npy", modality="ct", dataset="d", split="train"), **kw)


@pytest.mark.parametrize(
    "value,expect", [(True, True), (False, False), (1, True), (0, False), (None, False)]
)
def test_preprocessed_accepts_json_bools(value, expect):
    assert parse_record(_obj(preprocessed=value), "/r").preprocessed is expect


@pytest.mark.parametrize("value", ["false", "true", "0", "", 2, 1.0, [], {}])
def test_preprocessed_refuses_anything_else(tmp_path, value):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(_obj(id="first")) + "\n" + json.dumps(_obj(preprocessed=value)) + "\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert f"{p}:2" in str(e.value) and "'preprocessed'" in str(e.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("spacing", [float("nan"), 1, 1]),
        ("spacing", [1, float("inf")]),
        ("hu_slope", float("nan")),
        ("hu_intercept", float("inf")),
        ("hu_slope", True),
        ("shape", [0, 10, 10]),
        ("orientation", [1, 0, 0, 0, 1, float("nan")]),
    ],
)
def test_manifest_refuses_non_finite_numbers(field, value):
    with pytest.raises(ManifestError, match=repr(field)):
        parse_record(_obj(**{field: value}), "/r", "m.jsonl:7")


@pytest.mark.parametrize(
    "key,value",
    [
        ("views.long_side_2d", 0),
        ("views.long_side_3d", -112),
        ("max_bad_fraction", -0.01),
        ("max_bad_fraction", 1.5),
        ("max_bad_fraction", float("nan")),
        ("max_bad_retries", -1),
        ("max_image_voxels", 0),
        ("ct_window", (0.0, 250.0)),
        ("ct_window", (float("inf"), 0.0)),
        ("views.flips", (1.5, 0.0, 0.0)),
    ],
)
def test_validate_config_refuses_impossible_values_naming_the_key(key, value):
    cfg = data_config.demo_config()
    node, leaf = (cfg.views, key.split(".")[1]) if key.startswith("views.") else (cfg, key)
    setattr(node, leaf, value)
    with pytest.raises(ValueError, match=f"config data.{key}="):
        data_config.validate_config(cfg)


def test_validate_config_accepts_edges_and_older_configs():
    cfg = data_config.demo_config()
    cfg.max_bad_fraction, cfg.max_bad_retries, cfg.max_image_voxels = 0.0, 0, 1
    data_config.validate_config(cfg)
    cfg.max_bad_fraction = 1.0
    data_config.validate_config(cfg)
    import ml_collections

    old = ml_collections.ConfigDict(data_config.default_config().to_dict())
    del old["max_image_voxels"]  # an older run's config.json
    data_config.validate_config(old)
    assert data_config.max_image_voxels(old) == DEFAULT_MAX_VOXELS


# ---------------------------------------------------------------- through the train pipeline


def test_train_pipeline_skips_and_names_each_bad_file(tmp_path, caplog, capfd):
    """A 30000^3 NIfTI header, a 13 TiB RLE header, a NaN SliceThickness and identifier text in
    parsed tags: each is skipped by name with its category; the run goes on; the iterator state
    (stored in every checkpoint) and the log hold no identifier."""
    import nibabel as nib

    from mmv_jax.data import pipeline as P
    from mmv_jax.data.synthetic import make_demo_dataset

    caplog.set_level(logging.INFO)
    manifest = make_demo_dataset(str(tmp_path / "d"), n_cxr=16, n_ct=8, seed=1)
    bad_dir = tmp_path / "d" / "bad"
    bad_dir.mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    (bad_dir / "huge.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4100))
    ds = pydicom.dcmread(_f("emri_small_RLE.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.NumberOfFrames = 2000
    ds.save_as(bad_dir / "rle.dcm")
    _ct(bad_dir, "nan.dcm", SliceThickness="nan")
    _ct(bad_dir, "slope.dcm", RescaleSlope=MRN)
    _ct(bad_dir, "pi.dcm", PhotometricInterpretation=MRN)
    expect = {
        "huge.nii.gz": "max_image_voxels",
        "rle.dcm": "max_image_voxels",
        "nan.dcm": "non-finite SliceThickness",
        "slope.dcm": "non-numeric RescaleSlope",
        "pi.dcm": "unsupported PhotometricInterpretation",
    }
    recs = [json.loads(line) for line in open(manifest)]
    ct = [r for r in recs if r["split"] == "train" and r["modality"] == "ct"]
    cxr = [r for r in recs if r["split"] == "train" and r["modality"] == "cxr"]
    for r, name in zip(ct[:2] + cxr[:3], expect):
        r["path"] = f"bad/{name}"
        r.pop("spacing", None)
        r.pop("shape", None)
    with open(manifest, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    cfg = P.demo_config()
    cfg.manifest = manifest
    cfg.cxr_per_batch, cfg.ct_per_batch = 4, 2
    cfg.max_bad_fraction = 0.9
    it = P.make_train_iterator(cfg, seed=0)
    steps = max(len(cxr) // 4, len(ct) // 2) + 2  # every record drawn at least once
    for _ in range(steps):
        b, s = next(it)
        used = np.concatenate([g.view_sample[g.view_sample >= 0] for g in b])
        assert len(np.unique(used)) == 6  # still full batches
    state = it.get_state()
    assert int(state["bad_files"]) == len(expect)
    reasons = {
        os.path.basename(r.getMessage().split()[3].rstrip(":")): r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("skipping bad file")
    }
    assert set(reasons) == set(expect)
    for name, category in expect.items():
        assert category in reasons[name] and str(bad_dir / name) in caplog.text
    out, err = capfd.readouterr()
    for text in (json.dumps(state), caplog.text, out, err):
        assert MRN not in text
