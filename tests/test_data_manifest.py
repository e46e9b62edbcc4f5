"""Manifest validation (tests/test_data_manifest.py)."""

import json

import pytest
from helpers import load_build_manifest, write_csv

from mmv_jax.data.manifest import ManifestError, load_manifest, write_manifest


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def _rec(i, **kw):
    d = dict(id=f"r{i}", path=f"img/{i}.dcm", modality="cxr", dataset="d", split="train")
    d.update(kw)
    return d


def test_load_resolves_paths_and_filters(tmp_path):
    m = _write(
        tmp_path / "m.jsonl",
        [
            _rec(
                0, labels={"cardiomegaly": 1, "atelectasis": -1, "lung_opacity": None}, patient="p0"
            ),
            _rec(
                1,
                modality="ct",
                split="val",
                spacing=[1.5, 0.7, 0.7],
                hu_slope=1,
                hu_intercept=-1024,
                orientation=[1, 0, 0, 0, 1, 0],
            ),
            _rec(2, path="/abs/x.png"),
        ],
    )
    recs = load_manifest(m)
    assert recs[0].path == str(tmp_path / "img/0.dcm") and recs[2].path == "/abs/x.png"
    assert recs[0].labels == {"cardiomegaly": 1, "atelectasis": -1}
    assert recs[1].read_kwargs()["hu_intercept"] == -1024.0
    assert [r.id for r in load_manifest(m, splits="val")] == ["r1"]
    assert [r.id for r in load_manifest(m, modality="cxr")] == ["r0", "r2"]
    write_manifest(tmp_path / "out" / "m2.jsonl", recs)
    again = load_manifest(tmp_path / "out" / "m2.jsonl")
    assert [r.path for r in again] == [r.path for r in recs]


@pytest.mark.parametrize(
    "bad,msg",
    [
        ("{not json", "invalid JSON"),
        (dict(id="x", path="p", modality="mri", dataset="d", split="train"), "modality"),
        (dict(id="x", modality="cxr", dataset="d", split="train"), "'path'"),
        (dict(_rec(9), labels={"pneumonia": 1}), "unknown label"),
        (dict(_rec(9), labels={"cardiomegaly": 2}), "must be 1, 0, -1"),
        (dict(_rec(9), spacing=[1, -1]), "positive"),
        (dict(_rec(9), colour="red"), "unknown field"),
    ],
)
def test_errors_name_the_line(tmp_path, bad, msg):
    m = _write(tmp_path / "m.jsonl", [_rec(0), bad])
    with pytest.raises(ManifestError, match=msg) as e:
        load_manifest(m)
    assert f"{m}:2:" in str(e.value)


def test_duplicate_id_and_patient_across_splits(tmp_path):
    m = _write(tmp_path / "m.jsonl", [_rec(0), _rec(0)])
    with pytest.raises(ManifestError, match="duplicate id"):
        load_manifest(m)
    m = _write(tmp_path / "m.jsonl", [_rec(0, patient="p"), _rec(1, patient="p", split="test")])
    with pytest.raises(ManifestError, match=":2: a patient"):
        load_manifest(m)


def test_build_manifest_mimic_chexpert_ctrate(tmp_path):
    bm = load_build_manifest()
    m = tmp_path / "mimic"
    write_csv(
        m / "mimic-cxr-2.0.0-metadata.csv",
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [
            ["d1", "10000032", "500", "AP"],
            ["d2", "10000032", "500", "PA"],
            ["d3", "10000032", "500", "LATERAL"],
            ["d4", "11000001", "501", "LL"],
            ["d5", "12000002", "502", "AP"],
        ],
        gz=True,
    )
    write_csv(
        m / "mimic-cxr-2.0.0-split.csv",
        ["dicom_id", "study_id", "subject_id", "split"],
        [
            ["d1", "500", "10000032", "train"],
            ["d2", "500", "10000032", "train"],
            ["d4", "501", "11000001", "test"],
            ["d5", "502", "12000002", "validate"],
        ],
    )
    write_csv(
        m / "mimic-cxr-2.0.0-chexpert.csv",
        [
            "subject_id",
            "study_id",
            "Atelectasis",
            "Cardiomegaly",
            "Consolidation",
            "Edema",
            "Lung Opacity",
            "Pleural Effusion",
        ],
        [["10000032", "500", "1.0", "", "-1.0", "1.0", "0.0", ""]],
    )
    bm.main(
        [
            "mimic-cxr",
            "--root",
            str(m),
            "--out",
            str(tmp_path / "mimic.jsonl"),
            "--split",
            "official",
        ]
    )
    recs = load_manifest(tmp_path / "mimic.jsonl")
    assert [r.id for r in recs] == [
        "mimic-d2",
        "mimic-d5",
    ]  # PA preferred; lateral-only study dropped
    assert recs[0].labels == {
        "atelectasis": 1,
        "cardiomegaly": 0,
        "consolidation": -1,
        "lung_opacity": 0,
        "pleural_effusion": 0,
    }  # blank: not mentioned
    assert recs[1].labels == {}  # no row in the label CSV
    assert recs[0].path.endswith("files/p10/p10000032/s500/d2.jpg") and recs[1].split == "val"
    assert recs[0].patient == "mimic-10000032"

    c = tmp_path / "ctrate"
    write_csv(
        c / "metadata" / "train_metadata.csv",
        [
            "VolumeName",
            "RescaleSlope",
            "RescaleIntercept",
            "XYSpacing",
            "ZSpacing",
            "ImageOrientationPatient",
        ],
        [
            ["train_1_a_1.nii.gz", "1", "-1024", "[0.75, 0.75]", "1.5", "[1, 0, 0, 0, 1, 0]"],
            ["train_1_a_2.nii.gz", "1", "-8192", "[0.7, 0.7]", "1.0", ""],
        ],
    )
    write_csv(
        c / "multi_abnormality_labels" / "train_predicted_labels.csv",
        [
            "VolumeName",
            "Atelectasis",
            "Cardiomegaly",
            "Consolidation",
            "Lung opacity",
            "Pleural effusion",
            "Emphysema",
        ],
        [["train_1_a_1.nii.gz", "1", "0", "0", "1", "0", "1"]],
    )
    bm.main(["ct-rate", "--root", str(c), "--out", str(tmp_path / "ct.jsonl")])
    recs = load_manifest(tmp_path / "ct.jsonl")
    assert recs[0].spacing == (1.5, 0.75, 0.75) and recs[0].hu_intercept == -1024
    assert recs[0].orientation == (1, 0, 0, 0, 1, 0) and recs[1].orientation is None
    assert recs[0].path.endswith("train/train_1/train_1_a/train_1_a_1.nii.gz")
    assert recs[0].labels["atelectasis"] == 1 and recs[0].patient == recs[1].patient

    x = tmp_path / "chexpert"
    write_csv(
        x / "test_labels.csv",
        ["Path", "Atelectasis", "Cardiomegaly", "Lung Opacity"],
        [["test/patient64741/study1/view1_frontal.jpg", "0", "1", "1"]],
    )
    bm.main(["chexpert", "--root", str(x), "--out", str(tmp_path / "cx.jsonl")])
    recs = load_manifest(tmp_path / "cx.jsonl")
    assert recs[0].split == "test" and recs[0].labels == {
        "atelectasis": 0,
        "cardiomegaly": 1,
        "lung_opacity": 1,
    }
    bm.main(
        [
            "merge",
            str(tmp_path / "mimic.jsonl"),
            str(tmp_path / "ct.jsonl"),
            "--out",
            str(tmp_path / "all.jsonl"),
        ]
    )
    assert len(load_manifest(tmp_path / "all.jsonl")) == 4


def test_build_manifest_rad_chestct_and_npz_reader(tmp_path):
    import numpy as np

    from mmv_jax.data.readers import load_image

    bm = load_build_manifest()
    r = tmp_path / "rad"
    (r / "vols").mkdir(parents=True)
    np.savez_compressed(r / "vols" / "trn00001.npz", ct=np.full((20, 16, 16), -1000, np.int16))
    np.savez_compressed(r / "vols" / "tst00002.npz", ct=np.zeros((20, 16, 16), np.int16))
    write_csv(
        r / "labels.csv",
        [
            "NoteAcc_DEID",
            "atelectasis*left_lung",
            "atelectasis*right_lung",
            "opacity*left_lung",
            "cardiomegaly*heart",
        ],
        [["trn00001", "0", "1", "0", "0"], ["tst00002", "0", "0", "1", "1"]],
    )
    bm.main(["rad-chestct", "--root", str(r), "--out", str(tmp_path / "rad.jsonl")])
    recs = {x.id: x for x in load_manifest(tmp_path / "rad.jsonl")}
    a, b = recs["radchest-trn00001"], recs["radchest-tst00002"]
    assert a.split == b.split == "test" and a.spacing == (0.8, 0.8, 0.8)  # the external test set
    assert a.labels == {"atelectasis": 1, "lung_opacity": 0, "cardiomegaly": 0}
    assert b.labels["lung_opacity"] == 1
    img = load_image(a.path, **a.read_kwargs())
    assert img.array.shape == (20, 16, 16) and img.array.max() == -1000 and img.modality == "ct"
