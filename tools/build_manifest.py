"""Builds JSONL manifests (mmv_jax/data/manifest.py) from the official releases' own files.

    python tools/build_manifest.py mimic-cxr  --root DIR --out mimic.jsonl [--split paper|official] [--seed 0]
    python tools/build_manifest.py chexpert   --root DIR --out chexpert_test.jsonl
    python tools/build_manifest.py ct-rate    --root DIR --out ctrate.jsonl
    python tools/build_manifest.py rad-chestct --root DIR --out radchest.jsonl [--spacing 0.8 0.8 0.8]
    python tools/build_manifest.py merge a.jsonl b.jsonl --out all.jsonl
    python tools/build_manifest.py folder --images DIR --labels labels.csv --id-col image
        --patient-col patient --label-cols Pneumothorax "Pleural Effusion" --out mine.jsonl
        [--dataset NAME] [--modality cxr|ct] [--val 0.1] [--test 0.2] [--seed 0]

Expected folder layouts (as downloaded; CSVs may be gzipped, ``.csv.gz``):

MIMIC-CXR-JPG 2.0.0/2.1.0 (PhysioNet)::

    DIR/mimic-cxr-2.0.0-metadata.csv   dicom_id, subject_id, study_id, ViewPosition, ...
    DIR/mimic-cxr-2.0.0-split.csv      dicom_id, study_id, subject_id, split (train|validate|test)
    DIR/mimic-cxr-2.0.0-chexpert.csv   subject_id, study_id, <14 findings> (1.0, 0.0, -1.0, blank)
    DIR/files/p10/p10000032/s50414267/<dicom_id>.jpg

  One frontal image per study (PA preferred over AP, then the smallest dicom_id); labels are
  per study, joined on (subject_id, study_id): 1 -> 1, 0 -> 0, -1 -> -1 (uncertain; the probe's
  policy decides), blank -> 0 (the CheXpert labeller's "not mentioned" counts as negative); a
  study without a row in the label CSV has no labels. patient = subject_id.
  ``--split paper`` (default): the paper's internal split, a seeded patient-grouped 80/20 of
  these studies into ``train`` / ``test`` (whole patients, in a seeded order, go to test until it
  holds 20% of the studies). ``--split official``: the release's split (train -> train,
  validate -> val, test -> test; its test set is ~2% of studies).

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

    DIR/<any subfolders>/trn00001.npz, ...   one HU volume per file ([Z, H, W])
    DIR/<labels>.csv                   first column the volume name (``NoteAcc_DEID``);
                                       per-abnormality columns (``atelectasis``, ``cardiomegaly``,
                                       ``consolidation``, ``opacity``, ``pleural_effusion``) or
                                       abnormality*location columns (``atelectasis*left_lung``:
                                       any location counts)

  The paper's external 3D test set: every volume is split ``test`` whatever its name (the public
  release names them all ``trn...``), so none enters pretraining or the 2D/3D/ALL probes'
  training rows. Table 2's domain adaptation splits these test rows 80/20 inside the probe
  (``mmv-probe --train-dataset rad-chestct``). A CSV is a label file when its header has one of
  those columns; every row whose volume exists gives labels (the label files list more volumes
  than the public release holds). ``--spacing`` gives the voxel size (verify against the release
  notes; the default assumes the 0.8 mm isotropic resampling described by the dataset's paper).
  patient = ``MRN_DEID`` (the de-identified MRN) from a CSV whose header has ``NoteAcc_DEID`` and
  ``MRN_DEID`` (``CT_Scan_Metadata_Complete_35747.csv``), so the adaptation split keeps each
  patient's scans together; without that file every volume is its own patient.

Your own data (``folder``): a folder of images (any format ``load_image`` reads: DICOM files or
series folders, PNG/JPEG, NIfTI, NPY) and a CSV with one row per image. ``--id-col`` names each
image: a path relative to ``--images`` (``p1/a.dcm``), or a file name with or without its
extension found anywhere under it (``a``, ``a.dcm``); it becomes the record id, so use a
de-identified name. ``--patient-col`` groups the images of one patient: its values are replaced
by numbers (``<dataset>-p<k>``, in order of first appearance) and never written. ``--label-cols``
are the findings, one CSV column each (``Column`` gives the finding ``column`` in lower case with
``_`` for other characters; ``Column=name`` names it): 1 present, 0 absent, -1 uncertain, blank
unknown. They become the manifest's findings (its header line). The split is seeded and grouped
by patient: ``--test`` of the images go to ``test``, then ``--val`` to ``val``, the rest to
``train`` (whole patients, in a seeded order, until each holds its fraction). Images under
``--images`` that the CSV does not list are left out (counted in the summary).

No patient names, dates or other identifiers are read or written; ``patient`` is the dataset's
own de-identified subject id (``folder``: a number).
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmv_jax import cli  # noqa: E402
from mmv_jax.data.manifest import load_manifest, write_manifest  # noqa: E402
from mmv_jax.data.manifest_cli import stats  # noqa: E402
from mmv_jax.eval.probe import grouped_holdout  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_folder import _find, _label, _require, _rows, folder  # noqa: E402

# per-dataset column names of the five findings
MIMIC_COLS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "lung_opacity": "Lung Opacity",
    "pleural_effusion": "Pleural Effusion",
}
CTRATE_COLS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "lung_opacity": "Lung opacity",
    "pleural_effusion": "Pleural effusion",
}
RAD_COLS = {
    "atelectasis": "atelectasis",
    "cardiomegaly": "cardiomegaly",
    "consolidation": "consolidation",
    "lung_opacity": "opacity",
    "pleural_effusion": "pleural_effusion",
}


# ---------------------------------------------------------------- MIMIC-CXR-JPG


def _mimic_label(v) -> int:
    return 0 if v is None or str(v).strip() == "" else _label(v)


def mimic_cxr(root: str, split_mode: str = "paper", seed: int = 0) -> list[dict]:
    if split_mode not in ("paper", "official"):
        raise SystemExit(f"--split must be paper or official, got {split_mode!r}")
    meta = _find(root, "mimic-cxr-2.0.0-metadata.csv")
    split = _find(root, "mimic-cxr-2.0.0-split.csv")
    labels = _find(root, "mimic-cxr-2.0.0-chexpert.csv")
    _require(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    _require(split, ("dicom_id", "split"))
    _require(labels, ("subject_id", "study_id", *MIMIC_COLS.values()))
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
        row = lab.get((subj, study))
        labels_ = {k: _mimic_label(row.get(c)) for k, c in MIMIC_COLS.items()} if row else {}
        path = os.path.join("files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{dicom_id}.jpg")
        out.append(
            dict(
                id=f"mimic-{dicom_id}",
                patient=f"mimic-{subj}",
                modality="cxr",
                dataset="mimic-cxr",
                split=names[sp],
                labels=labels_,
                path=os.path.join(os.path.abspath(root), path),
            )
        )
    if split_mode == "paper":
        test = grouped_holdout([r["patient"] for r in out], 0.2, seed)
        for r, t in zip(out, test):
            r["split"] = "test" if t else "train"
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
        path = next(
            (
                p
                for p in (
                    os.path.join(base, rel),
                    os.path.join(root, rel),
                    os.path.join(root, rel.split("/", 1)[-1]),
                )
                if os.path.exists(p)
            ),
            os.path.join(base, rel),
        )
        labels_ = {k: v for k, c in MIMIC_COLS.items() if (v := _label(r.get(c))) is not None}
        out.append(
            dict(
                id="chexpert-" + re.sub(r"[^A-Za-z0-9]+", "-", rel).strip("-"),
                patient=f"chexpert-{m.group(1)}" if m else None,
                modality="cxr",
                dataset="chexpert",
                split="test",
                labels=labels_,
                path=os.path.abspath(path),
            )
        )
    return [{k: v for k, v in d.items() if v is not None} for d in out]


# ---------------------------------------------------------------- CT-RATE


def _floats(s) -> list[float]:
    v = ast.literal_eval(s) if isinstance(s, str) else s
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def ct_rate(root: str) -> list[dict]:
    out = []
    for part, split, lab_name, meta_name in (
        ("train", "train", "train_predicted_labels.csv", "train_metadata.csv"),
        ("valid", "test", "valid_predicted_labels.csv", "validation_metadata.csv"),
    ):
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
            rec = dict(
                id=f"ctrate-{name.replace('.nii.gz', '')}",
                patient=f"ctrate-{'_'.join(parts[:2])}",
                modality="ct",
                dataset="ct-rate",
                split=split,
                path=os.path.abspath(folder),
                spacing=[z, xy[0], xy[-1]],
                hu_slope=float(m["RescaleSlope"]),
                hu_intercept=float(m["RescaleIntercept"]),
            )
            iop = m.get("ImageOrientationPatient")
            if iop:
                try:
                    o = _floats(iop)
                    if len(o) == 6:
                        rec["orientation"] = o
                except (ValueError, SyntaxError):
                    pass
            row = labs.get(name, {})
            rec["labels"] = {
                k: v for k, c in CTRATE_COLS.items() if (v := _label(row.get(c))) is not None
            }
            out.append(rec)
    if not out:
        raise SystemExit(f"no CT-RATE metadata CSVs found under {root}")
    return out


# ---------------------------------------------------------------- RAD-ChestCT


def _rad_columns(header) -> dict:
    """``{finding: [columns]}`` of a RAD-ChestCT label header (empty: not a label file)."""
    cols = {
        k: [h for h in header[1:] if h == c or h.startswith(c + "*")] for k, c in RAD_COLS.items()
    }
    return {k: v for k, v in cols.items() if v}


def rad_chestct(root: str, spacing) -> list[dict]:
    vols = {
        os.path.basename(p)[:-4]: p
        for p in glob.glob(os.path.join(root, "**", "*.npz"), recursive=True)
    }
    if not vols:
        raise SystemExit(f"no .npz volumes under {root}")
    labels: dict[str, dict] = {}
    patient: dict[str, str] = {}
    n_files = 0
    for csv_path in sorted(glob.glob(os.path.join(root, "**", "*.csv*"), recursive=True)):
        opener = gzip.open if csv_path.endswith(".gz") else open
        with opener(csv_path, "rt", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if "NoteAcc_DEID" in header and "MRN_DEID" in header:  # the scan metadata
                i, j = header.index("NoteAcc_DEID"), header.index("MRN_DEID")
                patient.update(
                    (row[i], row[j])
                    for row in reader
                    if len(row) > max(i, j) and row[i] in vols and row[j]
                )
                continue
            cols = _rad_columns(header)
            if not cols:
                continue  # not a label file
            n_files += 1
            index = {h: i for i, h in enumerate(header)}
            for row in reader:
                key = row[0].strip() if row else ""
                key = key[:-4] if key.endswith(".npz") else key
                if key not in vols:
                    continue  # the label files list volumes the public release does not hold
                lab = labels.setdefault(key, {})
                for k, names in cols.items():
                    vals = [
                        x
                        for x in (_label(row[index[c]]) for c in names if index[c] < len(row))
                        if x is not None
                    ]
                    if vals:
                        lab[k] = max(lab.get(k, 0), max(vals))
    if not n_files:
        raise SystemExit(
            f"no RAD-ChestCT label CSV under {root} (a header with columns like "
            f"{', '.join(RAD_COLS.values())} or 'atelectasis*left_lung')"
        )
    out = []
    for name, path in sorted(vols.items()):
        rec = dict(
            id=f"radchest-{name}",
            modality="ct",
            dataset="rad-chestct",
            split="test",
            path=os.path.abspath(path),
            spacing=list(spacing),
            labels=labels.get(name, {}),
        )
        if name in patient:
            rec["patient"] = f"radchest-{patient[name]}"
        out.append(rec)
    return out


def main(argv=None) -> None:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "dataset", choices=["mimic-cxr", "chexpert", "ct-rate", "rad-chestct", "merge", "folder"]
    )
    ap.add_argument("inputs", nargs="*", help="manifests to merge (merge only)")
    ap.add_argument("--root", help="the release's folder")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(0.8, 0.8, 0.8),
        help="RAD-ChestCT voxel size z y x (mm)",
    )
    ap.add_argument(
        "--split-mode",
        "--split",
        dest="split",
        default="paper",
        choices=["paper", "official"],
        help="MIMIC-CXR: paper = seeded patient-grouped 80/20 train/test; "
        "official = the release's train/validate/test",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the paper / folder split")
    own = ap.add_argument_group("folder (your own data)")
    own.add_argument("--images", help="folder of images")
    own.add_argument("--labels", help="CSV, one row per image")
    own.add_argument(
        "--id-col", help="CSV column naming the image (path under --images or file name)"
    )
    own.add_argument("--patient-col", help="CSV column of the patient (replaced by a number)")
    own.add_argument("--label-cols", nargs="+", help="finding columns: Column or Column=name")
    own.add_argument("--dataset-name", help="dataset name (default: the --images folder's name)")
    own.add_argument("--modality", default="cxr", choices=["cxr", "ct"])
    own.add_argument("--val", type=float, default=0.1, help="fraction of images in split val")
    own.add_argument("--test", type=float, default=0.2, help="fraction of images in split test")
    a = ap.parse_args(argv)
    unlisted = None
    if a.dataset == "merge":
        manifests = [load_manifest(p) for p in a.inputs]
        findings = list(dict.fromkeys(f for m in manifests for f in m.findings))
        write_manifest(a.out, [r for m in manifests for r in m], findings=findings)
    elif a.dataset == "folder":
        missing = [
            f"--{k.replace('_', '-')}"
            for k in ("images", "labels", "id_col", "patient_col", "label_cols")
            if not getattr(a, k)
        ]
        if missing:
            ap.error(f"folder needs {', '.join(missing)}")
        recs, findings, unlisted = folder(
            a.images,
            a.labels,
            id_col=a.id_col,
            patient_col=a.patient_col,
            label_cols=a.label_cols,
            dataset=a.dataset_name,
            modality=a.modality,
            val=a.val,
            test=a.test,
            seed=a.seed,
        )
        write_manifest(a.out, recs, findings=findings)
        load_manifest(a.out)  # validate what was written
    else:
        if not a.root:
            ap.error("--root is required")
        fn = {
            "mimic-cxr": lambda r: mimic_cxr(r, a.split, a.seed),
            "chexpert": chexpert,
            "ct-rate": ct_rate,
            "rad-chestct": lambda r: rad_chestct(r, a.spacing),
        }[a.dataset]
        recs = fn(a.root)
        write_manifest(a.out, recs)
        load_manifest(a.out)  # validate what was written
    summary = dict(out=a.out, **stats(load_manifest(a.out)))  # counts only: no identifier
    if unlisted is not None:
        summary["unlisted_images_left_out"] = unlisted
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
