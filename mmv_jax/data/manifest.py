"""Manifest: a JSONL file, one JSON object (record) per image, validated on load.

Fields of a record:

- ``id``        str, unique in the file.
- ``path``      str, relative to the manifest's folder or absolute (file or DICOM series folder).
- ``modality``  ``"cxr"`` | ``"ct"``.
- ``dataset``   str (e.g. ``"mimic-cxr"``, ``"ct-rate"``, ``"demo"``).
- ``split``     str (``"train"``, ``"val"``, ``"test"``, ...).
- ``patient``   optional str: the dataset's de-identified subject id (splits never share one).
- ``labels``    optional object over the manifest's findings: 1 present, 0 absent,
                -1 uncertain; a missing key (or ``null``) is unknown.
- ``spacing``   optional ``[z, y, x]`` (or ``[y, x]``) mm, overrides the file's header.
- ``hu_slope``, ``hu_intercept`` optional floats, override the file's rescale (CT-RATE).
- ``orientation`` optional six DICOM ImageOrientationPatient cosines (CT-RATE NIfTI).
- ``preprocessed`` optional JSON bool (``true``/``false``; ``1``/``0`` accepted, anything else is
                an error): the file is an ``mmv-cache`` output, already resampled to the
                target size (the pipeline then skips the resize); ``shape`` optional ``[Z, H, W]``.

The findings (label names) are declared once, by the manifest: an optional header line before
the first record, ``{"findings": ["atelectasis", ..., "pneumothorax"]}`` (lower-case names,
``[a-z][a-z0-9_]*``, unique). Without one they are the paper's five, :data:`LABELS`. A record's
label outside them is an error. :func:`load_manifest` returns the records as a list whose
``findings`` attribute holds them, and everything downstream (the embedding file's ``labels``
columns, the probes, evaluation during training) takes them from there.

Errors name the file and the line number.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from mmv_jax import paths

LABELS = ("atelectasis", "cardiomegaly", "consolidation", "lung_opacity", "pleural_effusion")
MODALITIES = ("cxr", "ct")
_KNOWN = {
    "id",
    "path",
    "modality",
    "dataset",
    "split",
    "patient",
    "labels",
    "spacing",
    "hu_slope",
    "hu_intercept",
    "orientation",
    "preprocessed",
    "shape",
    "meta",
}


_FINDING = re.compile(r"[a-z][a-z0-9_]*")


class ManifestError(ValueError):
    pass


class Records(list):
    """The records of a manifest (a ``list``) and the ``findings`` it declares."""

    def __init__(self, records=(), findings=LABELS):
        super().__init__(records)
        self.findings = tuple(findings)


def check_findings(names, where: str = "findings") -> tuple[str, ...]:
    """Validates a list of finding names (non-empty, unique, ``[a-z][a-z0-9_]*``)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ManifestError(f"{where}: findings must be a non-empty list of names")
    for n in names:
        if not isinstance(n, str) or not _FINDING.fullmatch(n):
            raise ManifestError(
                f"{where}: finding name {n!r} must match [a-z][a-z0-9_]* "
                "(lower case, digits, underscores)"
            )
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: duplicate finding names")
    return tuple(names)


@dataclass(frozen=True)
class Record:
    id: str
    path: str  # absolute after loading
    modality: str
    dataset: str
    split: str
    patient: str | None = None
    labels: dict = field(default_factory=dict)
    spacing: tuple | None = None
    hu_slope: float | None = None
    hu_intercept: float | None = None
    orientation: tuple | None = None
    preprocessed: bool = False
    shape: tuple | None = None

    def read_kwargs(self) -> dict:
        """Keyword overrides for :func:`mmv_jax.data.readers.load_image`."""
        return dict(
            modality=self.modality,
            spacing=self.spacing,
            hu_slope=self.hu_slope,
            hu_intercept=self.hu_intercept,
            orientation=self.orientation,
        )

    def to_json(self, root: str | None = None) -> dict:
        d = {k: v for k, v in asdict(self).items() if v not in (None, {}, False)}
        if root is not None:
            try:
                d["path"] = os.path.relpath(self.path, root)
            except ValueError:
                pass
        for k in ("spacing", "orientation", "shape"):
            if k in d:
                d[k] = list(d[k])
        return d


def _err(where: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {msg}")


def parse_record(obj, root: str, where: str = "record", findings=LABELS) -> Record:
    """Validates one decoded JSON object; ``root`` resolves relative paths; ``findings``: the
    label names allowed (the manifest's)."""
    if not isinstance(obj, dict):
        raise _err(where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _KNOWN
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    for key in ("id", "path", "modality", "dataset", "split"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            raise _err(where, f"field {key!r} must be a non-empty string")
    if obj["modality"] not in MODALITIES:
        raise _err(where, f"modality must be one of {MODALITIES}, got {obj['modality']!r}")
    patient = obj.get("patient")
    if patient is not None and not isinstance(patient, (str, int)):
        raise _err(where, "field 'patient' must be a string")
    labels = obj.get("labels") or {}
    if not isinstance(labels, dict):
        raise _err(where, "field 'labels' must be an object")
    clean = {}
    for k, v in labels.items():
        if k not in findings:
            raise _err(
                where,
                f"unknown label {k!r} (the manifest's findings: "
                f"{', '.join(findings)}; declare others in a header line "
                '{"findings": [...]})',
            )
        if v is None:
            continue
        if v not in (1, 0, -1) or isinstance(v, bool):
            raise _err(where, f"label {k!r} must be 1, 0, -1 or null, got {v!r}")
        clean[k] = int(v)

    def floats(key, lengths):
        v = obj.get(key)
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or len(v) not in lengths:
            raise _err(
                where, f"field {key!r} must be a list of {' or '.join(map(str, lengths))} numbers"
            )
        if any(isinstance(x, bool) for x in v):
            raise _err(where, f"field {key!r} must hold numbers")
        try:
            out = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise _err(where, f"field {key!r} must hold numbers") from None
        if not all(math.isfinite(x) for x in out):  # json.loads accepts NaN and Infinity
            raise _err(where, f"field {key!r} must hold finite numbers")
        return out

    spacing = floats("spacing", (2, 3))
    if spacing is not None and min(spacing) <= 0:
        raise _err(where, "spacing must be positive")
    orientation = floats("orientation", (6,))
    shape = floats("shape", (3,))
    if shape is not None and (min(shape) < 1 or any(s != int(s) for s in shape)):
        raise _err(where, "field 'shape' must hold three positive integers")
    for key in ("hu_slope", "hu_intercept"):
        v = obj.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        ):
            raise _err(where, f"field {key!r} must be a finite number")
    preprocessed = obj.get("preprocessed", False)
    # strict: bool("false") is True, so a string here would silently skip the resize
    if preprocessed is None:
        preprocessed = False
    elif preprocessed not in (True, False, 0, 1) or isinstance(preprocessed, float):
        raise _err(
            where,
            "field 'preprocessed' must be true or false (a JSON boolean, or 1/0), "
            f"got a {type(preprocessed).__name__}",
        )
    path = obj["path"]
    if paths.is_uri(root) and not paths.is_uri(path):
        path = posixpath.join(root, path)
    elif not os.path.isabs(path) and not paths.is_uri(path):
        path = os.path.normpath(os.path.join(root, path))
    return Record(
        id=obj["id"],
        path=path,
        modality=obj["modality"],
        dataset=obj["dataset"],
        split=obj["split"],
        patient=None if patient is None else str(patient),
        labels=clean,
        spacing=spacing,
        hu_slope=None if obj.get("hu_slope") is None else float(obj["hu_slope"]),
        hu_intercept=None if obj.get("hu_intercept") is None else float(obj["hu_intercept"]),
        orientation=orientation,
        preprocessed=bool(preprocessed),
        shape=None if shape is None else tuple(int(s) for s in shape),
    )


def load_manifest(
    path,
    *,
    splits: Sequence[str] | str | None = None,
    modality: str | None = None,
    check_patients: bool = True,
) -> Records:
    """Reads and validates a JSONL manifest; optionally keeps only ``splits``/``modality``.
    Returns :class:`Records` (a list with the manifest's ``findings``).

    Raises :class:`ManifestError` naming the line for a malformed record, a duplicate id, or
    (``check_patients``) a patient that appears in two splits of the same dataset.
    """
    resolved = paths.resolve(path)
    path = os.fspath(path)
    if not resolved.is_file():
        raise ManifestError(f"{path}: manifest not found")
    root = str(resolved.parent)
    records: list[Record] = []
    findings = LABELS
    header_line = None
    seen: dict[str, int] = {}
    patient_split: dict[tuple, tuple] = {}
    with resolved.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(where, f"invalid JSON ({e.msg})") from None
            if isinstance(obj, dict) and "findings" in obj:
                if records or header_line is not None:
                    raise _err(where, "the findings header must come before the first record, once")
                if set(obj) != {"findings"}:
                    raise _err(where, f"the header holds only 'findings', got {sorted(obj)}")
                findings = check_findings(obj["findings"], where)
                header_line = lineno
                continue
            rec = parse_record(obj, root, where, findings)
            if rec.id in seen:
                raise _err(where, f"duplicate id {rec.id!r} (first on line {seen[rec.id]})")
            seen[rec.id] = lineno
            if check_patients and rec.patient is not None:
                key = (rec.dataset, rec.patient)
                prev = patient_split.setdefault(key, (rec.split, lineno))
                if prev[0] != rec.split:
                    raise _err(
                        where,
                        f"a patient of dataset {rec.dataset!r} is in split "
                        f"{rec.split!r} and in split {prev[0]!r} (line {prev[1]})",
                    )
            records.append(rec)
    if isinstance(splits, str):
        splits = (splits,)
    if splits is not None:
        records = [r for r in records if r.split in tuple(splits)]
    if modality is not None:
        records = [r for r in records if r.modality == modality]
    return Records(records, findings)


def write_manifest(
    path, records: Iterable[Record | dict], *, relative: bool = True, findings=None
) -> None:
    """Writes records as JSONL (atomically); paths are made relative to the file's folder.
    ``findings`` (default: ``records.findings`` of a :class:`Records`, else the paper's five)
    goes into the header line when it is not the default."""
    if findings is None:
        findings = getattr(records, "findings", LABELS)
    findings = check_findings(list(findings))
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(root, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if findings != LABELS:
            f.write(json.dumps({"findings": list(findings)}) + "\n")
        for r in records:
            d = r.to_json(root if relative else None) if isinstance(r, Record) else dict(r)
            f.write(json.dumps(d, sort_keys=True) + "\n")
    os.replace(tmp, path)
