"""Builds JSONL manifests (mmv_jax/data/manifest.py) from the official releases' own files.

    python tools/build_manifest.py mimic-cxr  --root DIR --out mimic.jsonl
    python tools/build_manifest.py chexpert   --root DIR --out chexpert_test.jsonl
    python tools/build_manifest.py ct-rate    --root DIR --out ctrate.jsonl
    python tools/build_manifest.py rad-chestct --root DIR --out radchest.jsonl [--spacing 0.8 0.8 0.8]
    python tools/build_manifest.py merge a.jsonl b.jsonl --out all.jsonl

Expected folder layouts (as downloaded; CSVs may be gzipped, ``.csv.gz``):

MIMIC-CXR-JPG 2.0.0/2.1.0 (PhysioNet)::

    DIR/mimic-cxr-2.0.0-metadata.csv   dicom_id, subject_id, study_id, ViewPosition, ...
    DIR/mimic-cxr-2.0.0-split.csv      dicom_id, study_id, subject_id, split (train|validate|test)
    DIR/mimic-cxr-2.0.0-chexpert.csv   subject_id, study_id, <14 findings> (1.0, 0.0, -1.0, blank)
    DIR/files/p10/p10000032/s50414267/<dicom_id>.jpg

  One frontal image per study (PA preferred over AP, then the smallest dicom_id); labels are
  per study, joined on (subject_id, study_id); splits train -> train, validate -> val,
  test -> test; patient = subject_id.

CheXpert radiologist-labelled test set::

    DIR/test_labels.csv                Path, <findings> (0/1); Path like test/patient64741/study1/view1_frontal.jpg
    DIR/test/patient64741/study1/view1_frontal.jpg

  Every image listed (the paper's n = 668); split test; patient from the path.

CT-RATE (Hugging Face ibrahimhamamci/CT-RATE, ``dataset/`` folder)::

    DIR/train/train_1/train_1_a/train_1_a_1.nii.gz      (and DIR/valid/valid_1/...)
    DIR/multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
                                       VolumeName, <18 abnormalities> (0/1)
    DIR/metadata/train_metadata.csv, validation_metadata.csv
                                       VolumeName, RescaleSlope, RescaleIntercept, XYSpacing
                                       ("[0.75, 0.75]"), ZSpacing, ImageOrientationPatient, ...

  The NIfTI headers carry no spacing, orientation or scaling, so ``spacing`` (ZSpacing,
  XYSpacing), ``orientation`` (ImageOrientationPatient) and ``hu_slope``/``hu_intercept`` go into
  the manifest. The reader assumes the voxel axes (i, j, k) follow the DICOM row cosine, the column
  cosine and the slice normal. Splits train -> train, valid -> test (the internal test set);
  patient = ``train_1`` from ``train_1_a_1``. Labels: Atelectasis, Cardiomegaly, Consolidation,
  Lung opacity, Pleural effusion.

RAD-ChestCT (Zenodo 6406114)::

    DIR/<any subfolders>/trn00001.npz, val..., tst...   one HU volume per file ([Z, H, W])
    DIR/<labels>.csv                   first column the volume name; per-abnormality columns
                                       (``atelectasis``, ``cardiomegaly``, ``consolidation``,
                                       ``opacity``, ``pleural_effusion``) or abnormality*location
                                       columns (``atelectasis*left_lung``: any location counts)

  Split from the name prefix (trn/val/tst -> train/val/test). ``--spacing`` gives the voxel size
  (verify against the release notes; the default assumes the 0.8 mm isotropic resampling
  described by the dataset's paper). Patients are not identified in the public release.

No patient names, dates or other identifiers are read or written; ``patient`` is the dataset's
own de-identified subject id.
"""
from __future__ import annotations

import argparse
import ast
import csv
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmv_jax.data.manifest import load_manifest, write_manifest  # noqa: E402

# per-dataset column names of the five findings
MIMIC_COLS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
              "consolidation": "Consolidation", "lung_opacity": "Lung Opacity",
              "pleural_effusion": "Pleural Effusion"}
CTRATE_COLS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
               "consolidation": "Consolidation", "lung_opacity": "Lung opacity",
               "pleural_effusion": "Pleural effusion"}
RAD_COLS = {"atelectasis": "atelectasis", "cardiomegaly": "cardiomegaly",
            "consolidation": "consolidation", "lung_opacity": "opacity",
            "pleural_effusion": "pleural_effusion"}


def _find(root: str, name: str) -> str:
    for cand in (name, name + ".gz"):
        hits = glob.glob(os.path.join(root, "**", cand), recursive=True)
        if hits:
            return sorted(hits, key=len)[0]
    raise SystemExit(f"{name}(.gz) not found under {root}")


def _rows(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        yield from csv.DictReader(f)


def _label(v) -> int | None:
    if v is None or str(v).strip() == "":
        return None
    x = float(v)
    return 1 if x > 0 else (-1 if x < 0 else 0)


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def mimic_cxr(root: str) -> list[dict]:
    meta = _find(root, "mimic-cxr-2.0.0-metadata.csv")
    split = _find(root, "mimic-cxr-2.0.0-split.csv")
    labels = _find(root, "mimic-cxr-2.0.0-chexpert.csv")
    split_of = {r["dicom_id"]: r["split"] for r in _rows(split)}
    lab = {(r["subject_id"], r["study_id"]): r for r in _rows(labels)}
    best: dict[tuple, tuple] = {}
    rank = {"PA": 0, "AP": 1}
    for r in _rows(meta):
        view = (r.get("ViewPosition") or "").upper()
        if view not in rank:
            continue
        key = (r["subject_id"], r["study_id"])
        cand = (rank[view], r["dicom_id"])
        if key not in best or cand < best[key]:
            best[key] = cand
    names = {"train": "train", "validate": "val", "test": "test"}
    out = []
    for (subj, study), (_, dicom_id) in sorted(best.items()):
        sp = split_of.get(dicom_id)
        if sp not in names:
            continue
        row = lab.get((subj, study), {})
        labels_ = {k: v for k, c in MIMIC_COLS.items() if (v := _label(row.get(c))) is not None}
        path = os.path.join("files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{dicom_id}.jpg")
        out.append(dict(id=f"mimic-{dicom_id}", patient=f"mimic-{subj}", modality="cxr",
                        dataset="mimic-cxr", split=names[sp], labels=labels_,
                        path=os.path.join(os.path.abspath(root), path)))
    return out


# ---------------------------------------------------------------- CheXpert test

def chexpert(root: str) -> list[dict]:
    labels = _find(root, "test_labels.csv")
    base = os.path.dirname(labels)
    out = []
    for r in _rows(labels):
        rel = r["Path"]
        m = re.search(r"patient(\d+)", rel)
        # Path may start with "CheXpert-v1.0/" or "test/"; resolve against the CSV's folder or root
        path = next((p for p in (os.path.join(base, rel), os.path.join(root, rel),
                                 os.path.join(root, rel.split("/", 1)[-1])) if os.path.exists(p)),
                    os.path.join(base, rel))
        labels_ = {k: v for k, c in MIMIC_COLS.items() if (v := _label(r.get(c))) is not None}
        out.append(dict(id="chexpert-" + re.sub(r"[^A-Za-z0-9]+", "-", rel).strip("-"),
                        patient=f"chexpert-{m.group(1)}" if m else None, modality="cxr",
                        dataset="chexpert", split="test", labels=labels_, path=os.path.abspath(path)))
    return [{k: v for k, v in d.items() if v is not None} for d in out]


# ---------------------------------------------------------------- CT-RATE

def _floats(s) -> list[float]:
    v = ast.literal_eval(s) if isinstance(s, str) else s
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def ct_rate(root: str) -> list[dict]:
    out = []
    for part, split, lab_name, meta_name in (
            ("train", "train", "train_predicted_labels.csv", "train_metadata.csv"),
            ("valid", "test", "valid_predicted_labels.csv", "validation_metadata.csv")):
        try:
            meta = {r["VolumeName"]: r for r in _rows(_find(root, meta_name))}
        except SystemExit:
            continue
        labs = {r["VolumeName"]: r for r in _rows(_find(root, lab_name))}
        for name, m in sorted(meta.items()):
            parts = name.replace(".nii.gz", "").split("_")  # train_1_a_1
            folder = os.path.join(root, part, "_".join(parts[:2]), "_".join(parts[:3]), name)
            xy = _floats(m["XYSpacing"])
            z = _floats(m["ZSpacing"])[0]
            rec = dict(id=f"ctrate-{name.replace('.nii.gz', '')}", patient=f"ctrate-{'_'.join(parts[:2])}",
                       modality="ct", dataset="ct-rate", split=split, path=os.path.abspath(folder),
                       spacing=[z, xy[0], xy[-1]], hu_slope=float(m["RescaleSlope"]),
                       hu_intercept=float(m["RescaleIntercept"]))
            iop = m.get("ImageOrientationPatient")
            if iop:
                try:
                    o = _floats(iop)
                    if len(o) == 6:
                        rec["orientation"] = o
                except (ValueError, SyntaxError):
                    pass
            row = labs.get(name, {})
            rec["labels"] = {k: v for k, c in CTRATE_COLS.items() if (v := _label(row.get(c))) is not None}
            out.append(rec)
    if not out:
        raise SystemExit(f"no CT-RATE metadata CSVs found under {root}")
    return out


# ---------------------------------------------------------------- RAD-ChestCT

def rad_chestct(root: str, spacing) -> list[dict]:
    vols = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(root, "**", "*.npz"), recursive=True)}
    if not vols:
        raise SystemExit(f"no .npz volumes under {root}")
    labels: dict[str, dict] = {}
    for csv_path in glob.glob(os.path.join(root, "**", "*.csv*"), recursive=True):
        rows = _rows(csv_path)
        for r in rows:
            key = next(iter(r.values()))
            if key not in vols:
                break  # not a label file keyed by volume name
            lab = labels.setdefault(key, {})
            for k, c in RAD_COLS.items():
                vals = [v for col, v in r.items() if col == c or col.startswith(c + "*")]
                vals = [x for x in (_label(v) for v in vals) if x is not None]
                if vals:
                    lab[k] = max(lab.get(k, 0), max(vals))
    prefix = {"trn": "train", "val": "val", "tst": "test"}
    out = []
    for name, path in sorted(vols.items()):
        out.append(dict(id=f"radchest-{name}", modality="ct", dataset="rad-chestct",
                        split=prefix.get(name[:3], "test"), path=os.path.abspath(path),
                        spacing=list(spacing), labels=labels.get(name, {})))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", choices=["mimic-cxr", "chexpert", "ct-rate", "rad-chestct", "merge"])
    ap.add_argument("inputs", nargs="*", help="manifests to merge (merge only)")
    ap.add_argument("--root", help="the release's folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 0.8),
                    help="RAD-ChestCT voxel size z y x (mm)")
    a = ap.parse_args(argv)
    if a.dataset == "merge":
        recs = [r for p in a.inputs for r in load_manifest(p)]
        write_manifest(a.out, recs)
    else:
        if not a.root:
            ap.error("--root is required")
        fn = {"mimic-cxr": mimic_cxr, "chexpert": chexpert, "ct-rate": ct_rate,
              "rad-chestct": lambda r: rad_chestct(r, a.spacing)}[a.dataset]
        recs = fn(a.root)
        write_manifest(a.out, recs)
        load_manifest(a.out)  # validate what was written
    counts: dict = {}
    for r in load_manifest(a.out):
        counts[r.split] = counts.get(r.split, 0) + 1
    print(json.dumps({"out": a.out, "records": sum(counts.values()), "splits": counts}))


if __name__ == "__main__":
    main()
