"""``tools/build_manifest.py folder``: a manifest of your own images and labels (see that
file's doc), and the CSV helpers every subcommand of it uses."""

from __future__ import annotations

import csv
import glob
import gzip
import os
import re

import numpy as np

from mmv_jax.data.manifest import ManifestError, check_findings
from mmv_jax.eval.probe import grouped_holdout


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


def _require(path: str, columns) -> None:
    """One clear error naming the file and the columns it lacks."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {missing}")


# ---------------------------------------------------------------- your own data


def _finding_spec(spec: str) -> tuple[str, str]:
    """``Column`` or ``Column=name`` -> (column, finding name)."""
    col, _, name = spec.partition("=")
    return col, name or re.sub(r"[^a-z0-9]+", "_", col.lower()).strip("_")


def _image_index(images: str) -> dict:
    """Every file (and DICOM series folder) under ``images`` by its name and by its name
    without extensions; a name that two files share maps to None (ambiguous)."""
    index: dict = {}
    for root, dirs, files in os.walk(images):
        for name in files + dirs:  # a DICOM series is a folder
            full = os.path.join(root, name)
            for key in {name, name.split(".")[0]}:
                index[key] = None if key in index and index[key] != full else full
    return index


def folder(
    images: str,
    labels_csv: str,
    *,
    id_col: str,
    patient_col: str,
    label_cols,
    dataset: str | None = None,
    modality: str = "cxr",
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> tuple[list[dict], tuple, int]:
    """Records of a folder of images + a labels CSV (see the module doc); returns
    ``(records, findings, images under the folder the CSV does not list)``."""
    if not os.path.isdir(images):
        raise SystemExit(f"--images {images!r} is not a folder")
    if not os.path.isfile(labels_csv):
        raise SystemExit(f"--labels {labels_csv!r} not found")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SystemExit(f"--val {val} and --test {test} must be fractions with val + test < 1")
    specs = [_finding_spec(c) for c in label_cols]
    try:
        findings = check_findings([name for _, name in specs], "--label-cols")
    except ManifestError as e:
        raise SystemExit(str(e)) from None
    _require(labels_csv, [id_col, patient_col, *(c for c, _ in specs)])
    dataset = dataset or os.path.basename(os.path.normpath(images))
    index = _image_index(images)
    out, used, patients = [], set(), {}
    for line, row in enumerate(_rows(labels_csv), 2):
        where = f"{labels_csv}:{line}"
        name, patient = (row.get(id_col) or "").strip(), (row.get(patient_col) or "").strip()
        if not name or not patient:
            raise SystemExit(f"{where}: empty {id_col if not name else patient_col!r}")
        path = os.path.join(images, name)
        if not os.path.exists(path):
            path = index.get(name) or index.get(os.path.basename(name).split(".")[0])
        if path is None:
            raise SystemExit(
                f"{where}: no image (or more than one) named by column {id_col!r} under {images}"
            )
        path = os.path.normpath(path)
        if path in used:
            raise SystemExit(f"{where}: a second row for the same image")
        used.add(path)
        labels = {}
        for col, f in specs:
            try:
                v = _label(row.get(col))
                if v is not None and float(row[col]) not in (1, 0, -1):
                    raise ValueError
            except ValueError:
                raise SystemExit(f"{where}: column {col!r} must be 1, 0, -1 or blank") from None
            if v is not None:
                labels[f] = v
        pid = patients.setdefault(patient, f"{dataset}-p{len(patients)}")
        out.append(
            dict(
                id=name,
                patient=pid,
                modality=modality,
                dataset=dataset,
                labels=labels,
                path=os.path.abspath(path),
            )
        )
    if not out:
        raise SystemExit(f"{labels_csv}: no rows")
    pids = np.array([r["patient"] for r in out])
    is_test = grouped_holdout(pids, test, seed) if test else np.zeros(len(out), bool)
    rest = np.flatnonzero(~is_test)
    is_val = np.zeros(len(out), bool)
    if val and rest.size:
        is_val[rest] = grouped_holdout(pids[rest], val / (1 - test), seed + 1)
    for r, t, v in zip(out, is_test, is_val):
        r["split"] = "test" if t else "val" if v else "train"
    return out, findings, _unlisted(images, used)


def _unlisted(images: str, used: set) -> int:
    """Files under ``images`` that no record uses (itself or inside a series folder)."""
    n = 0
    for root, _, files in os.walk(images):
        inside = any(os.path.normpath(p) in used for p in _parents(root, images))
        n += (
            0 if inside else sum(os.path.normpath(os.path.join(root, f)) not in used for f in files)
        )
    return n


def _parents(folder: str, top: str):
    while True:
        yield folder
        if os.path.normpath(folder) == os.path.normpath(top):
            return
        folder = os.path.dirname(folder)
