"""tools/build_manifest.py on small fake release trees whose CSVs carry the releases' own headers:
MIMIC-CXR labels (blank = 0) and the paper's patient-grouped 80/20 split; RAD-ChestCT as the
external test set (every volume test, labels from every listed volume that exists)."""

import json
import os

import numpy as np
import pytest
from helpers import load_build_manifest, write_csv

from mmv_jax.data import pipeline
from mmv_jax.data.manifest import load_manifest

MIMIC_META = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_SPLIT = ["dicom_id", "study_id", "subject_id", "split"]
MIMIC_CHEXPERT = [
    "subject_id",
    "study_id",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
FIVE = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "lung_opacity": "Lung Opacity",
    "pleural_effusion": "Pleural Effusion",
}


def _fake_mimic(root, n_patients=60, seed=0):
    """Patients with 1-5 studies; each study a frontal (PA or AP, sometimes both) and a lateral
    image, some studies lateral only; label cells drawn from 1.0 / 0.0 / -1.0 / blank; one study
    without a label row. Returns the expected {study: (frontal dicom, labels)}."""
    rng = np.random.default_rng(seed)
    meta, split, chex, want = [], [], [], {}
    official = ["train", "validate", "test"]
    for p in range(n_patients):
        subj = str(10000000 + 37 * p)
        sp = official[int(rng.choice(3, p=[0.9, 0.05, 0.05]))]
        for s in range(int(rng.integers(1, 6))):
            study = str(50000000 + 100 * p + s)
            lateral_only = rng.random() < 0.1
            dicoms = [(f"{study}-lat", "LATERAL")]
            if not lateral_only:
                dicoms.append((f"{study}-ap", "AP"))
                if rng.random() < 0.5:
                    dicoms.append((f"{study}-pa", "PA"))
            for d, view in dicoms:
                meta.append(
                    [
                        d,
                        subj,
                        study,
                        "CHEST (PA AND LAT)",
                        view,
                        "3056",
                        "2544",
                        "21800506",
                        "213014.531",
                        "CHEST (PA AND LAT)",
                        "postero-anterior",
                        "Erect",
                    ]
                )
                split.append([d, study, subj, sp])
            cells = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(MIMIC_CHEXPERT) - 2)
            if p == 3 and s == 0:
                cells = None  # no label row for this study
            else:
                chex.append([subj, study, *cells])
            if not lateral_only:
                frontal = f"{study}-pa" if any(v == "PA" for _, v in dicoms) else f"{study}-ap"
                labels = (
                    {}
                    if cells is None
                    else {
                        k: {"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}[
                            cells[MIMIC_CHEXPERT.index(c) - 2]
                        ]
                        for k, c in FIVE.items()
                    }
                )
                want[study] = (frontal, labels, subj, sp)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, meta, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", MIMIC_SPLIT, split, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", MIMIC_CHEXPERT, chex, gz=True)
    return want


def test_mimic_labels_and_paper_split(tmp_path, capsys):
    bm = load_build_manifest()
    want = _fake_mimic(tmp_path / "mimic")
    out = tmp_path / "mimic.jsonl"
    bm.main(["mimic-cxr", "--root", str(tmp_path / "mimic"), "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = load_manifest(out)
    # one frontal image per study (PA preferred), lateral-only studies dropped
    assert sorted(r.id for r in recs) == sorted(f"mimic-{f}" for f, *_ in want.values())
    by_id = {r.id: r for r in recs}
    for frontal, labels, subj, _ in want.values():
        r = by_id[f"mimic-{frontal}"]
        assert r.labels == labels  # blank -> 0, -1 kept, no label row -> {}
        assert r.patient == f"mimic-{subj}"
    assert any(-1 in r.labels.values() for r in recs) and any(r.labels == {} for r in recs)
    # the paper split: train / test only, grouped by patient, ~20% test
    splits = {}
    for r in recs:
        splits.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    assert {r.split for r in recs} == {"train", "test"}
    n_test = sum(r.split == "test" for r in recs)
    assert abs(n_test - 0.2 * len(recs)) <= 5  # at most one patient's studies over
    assert printed["splits"] == {"train": len(recs) - n_test, "test": n_test}
    assert printed["patients_in_several_splits"] == 0
    assert sum(printed["patients"].values()) == len(splits)
    assert "1000" not in json.dumps(printed)  # counts only, no subject ids
    # seeded: the same seed gives the same split, another seed another one
    bm.main(["mimic-cxr", "--root", str(tmp_path / "mimic"), "--out", str(tmp_path / "b.jsonl")])
    bm.main(
        [
            "mimic-cxr",
            "--root",
            str(tmp_path / "mimic"),
            "--out",
            str(tmp_path / "c.jsonl"),
            "--seed",
            "1",
        ]
    )
    split_of = lambda p: {r.id: r.split for r in load_manifest(p)}
    assert split_of(tmp_path / "b.jsonl") == split_of(out) != split_of(tmp_path / "c.jsonl")
    # the release's own split on request
    bm.main(
        [
            "mimic-cxr",
            "--root",
            str(tmp_path / "mimic"),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--split",
            "official",
        ]
    )
    names = {"train": "train", "validate": "val", "test": "test"}
    for r in load_manifest(tmp_path / "o.jsonl"):
        frontal = r.id[len("mimic-") :]
        (sp,) = [w[3] for w in want.values() if w[0] == frontal]
        assert r.split == names[sp]


def test_mimic_missing_label_column_names_the_file(tmp_path):
    bm = load_build_manifest()
    root = tmp_path / "mimic"
    _fake_mimic(root, n_patients=3)
    write_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv",
        [c for c in MIMIC_CHEXPERT if c != "Cardiomegaly"],
        [],
        gz=True,
    )
    with pytest.raises(
        SystemExit, match=r"mimic-cxr-2.0.0-chexpert.csv.gz: missing column\(s\) \['Cardiomegaly'\]"
    ):
        bm.main(["mimic-cxr", "--root", str(root), "--out", str(tmp_path / "m.jsonl")])


RAD_HEADER = [
    "NoteAcc_DEID",
    "atelectasis*left_lung",
    "atelectasis*right_lung",
    "cardiomegaly*heart",
    "consolidation*left_lung",
    "consolidation*right_lung",
    "nodule*left_lung",
    "opacity*left_lung",
    "opacity*right_lung",
    "pleural_effusion*left_lung",
    "pleural_effusion*right_lung",
]


def _fake_rad(root, n_vols=6):
    for i in range(1, n_vols + 1):
        (root / "vols").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(root / "vols" / f"trn{i:05d}.npz", ct=np.zeros((4, 8, 8), np.int16))
    rows = []
    for i in (999, 1, 2, 500, 3, 4, 5):  # volumes 999 and 500 are not in the release
        cells = ["0"] * (len(RAD_HEADER) - 1)
        cells[0 if i % 2 else 1] = "1"  # atelectasis, one side or the other
        if i == 2:
            cells[RAD_HEADER.index("opacity*right_lung") - 1] = "1"
            cells[RAD_HEADER.index("nodule*left_lung") - 1] = "1"
        rows.append([f"trn{i:05d}", *cells])
    write_csv(root / "labels" / "imgtrn_Abnormality_and_Location_Labels.csv", RAD_HEADER, rows)
    # the scan metadata (not labels, recognised by its header): the patient of each volume;
    # volumes 1 and 2 are one patient's, volume 6 is not listed
    write_csv(
        root / "CT_Scan_Metadata_Complete_35747.csv",
        ["NoteAcc_DEID", "MRN_DEID", "Slices"],
        [[f"trn{i:05d}", f"AA{(i + 1) // 2 if i > 1 else 1:05d}", "400"] for i in range(1, n_vols)],
    )


def test_rad_chestct_is_the_external_test_set(tmp_path):
    bm = load_build_manifest()
    _fake_rad(tmp_path / "rad")
    bm.main(["rad-chestct", "--root", str(tmp_path / "rad"), "--out", str(tmp_path / "rad.jsonl")])
    recs = {r.id: r for r in load_manifest(tmp_path / "rad.jsonl")}
    assert len(recs) == 6 and {r.split for r in recs.values()} == {"test"}
    for i in range(1, 6):  # every listed volume that exists has labels
        lab = recs[f"radchest-trn{i:05d}"].labels
        assert lab["atelectasis"] == 1 and lab["cardiomegaly"] == 0
        assert lab["lung_opacity"] == (1 if i == 2 else 0)
        assert set(lab) == set(FIVE)
    assert recs["radchest-trn00006"].labels == {}  # not in the label file
    assert (
        recs["radchest-trn00001"].patient == recs["radchest-trn00002"].patient == "radchest-AA00001"
    )
    assert recs["radchest-trn00003"].patient != recs["radchest-trn00001"].patient
    assert recs["radchest-trn00006"].patient is None

    # no RAD-ChestCT volume enters pretraining: merged with MIMIC, the training records hold none
    _fake_mimic(tmp_path / "mimic", n_patients=10)
    bm.main(["mimic-cxr", "--root", str(tmp_path / "mimic"), "--out", str(tmp_path / "m.jsonl")])
    bm.main(
        [
            "merge",
            str(tmp_path / "m.jsonl"),
            str(tmp_path / "rad.jsonl"),
            "--out",
            str(tmp_path / "all.jsonl"),
        ]
    )
    train = load_manifest(
        tmp_path / "all.jsonl", splits=tuple(pipeline.default_config().train_splits)
    )
    assert train and not any(r.dataset == "rad-chestct" for r in train)


def test_rad_chestct_without_label_file_is_an_error(tmp_path):
    bm = load_build_manifest()
    _fake_rad(tmp_path / "rad")
    os.remove(tmp_path / "rad" / "labels" / "imgtrn_Abnormality_and_Location_Labels.csv")
    with pytest.raises(SystemExit, match="no RAD-ChestCT label CSV"):
        bm.main(
            ["rad-chestct", "--root", str(tmp_path / "rad"), "--out", str(tmp_path / "r.jsonl")]
        )
