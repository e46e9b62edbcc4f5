"""The embedding file: one ``.npz`` written by ``mmv-embed``, read by ``mmv-probe`` and the analyses.

Arrays (N rows, one per image):

- ``ids``        ``[N]`` str
- ``embeddings`` ``[N, d]`` float32 (frozen encoder features)
- ``modality``   ``[N]`` str, ``"cxr"`` or ``"ct"``
- ``dataset``    ``[N]`` str (e.g. ``"mimic"``, ``"chexpert"``, ``"ct-rate"``, ``"rad-chestct"``)
- ``split``      ``[N]`` str (``"train"``, ``"val"``/``"valid"``/``"validate"``, ``"test"``)
- ``labels``     ``[N, F]`` float32, one column per finding in ``findings`` order; 1 positive,
  0 negative, -1 uncertain, NaN missing.
- ``findings``   ``[F]`` str, the finding names (the manifest's, see
  :mod:`mmv_jax.data.manifest`). Optional when reading: a file without it holds the paper's
  five, :data:`FINDINGS`. Written always.

Optional:

- ``group``      ``[N]`` int, the patient: rows of one patient share a value (a number, never the
  patient's id), so hold-outs are split by patient. Without it every row is its own group.

Extra arrays are kept as they are. Strings are stored as fixed-width unicode (never pickled
objects), so ``np.load(..., allow_pickle=False)`` reads the file.
"""

from __future__ import annotations

import os

import numpy as np

from mmv_jax.data.manifest import LABELS, ManifestError, check_findings

FINDINGS = LABELS  # the paper's five: the default set of findings
STRING_FIELDS = ("ids", "modality", "dataset", "split")
REQUIRED = ("ids", "embeddings", "modality", "dataset", "split", "labels")
MODALITIES = ("cxr", "ct")

__all__ = ["FINDINGS", "REQUIRED", "findings_of", "load_embeddings", "save_embeddings", "validate"]


def findings_of(data: dict) -> tuple[str, ...]:
    """The finding names of an embedding file's arrays (the ``labels`` columns)."""
    return (
        tuple(np.asarray(data["findings"]).astype(str).tolist()) if "findings" in data else FINDINGS
    )


def validate(arrays: dict, source: str = "embeddings") -> dict:
    """Checks names, shapes and values; returns the arrays normalised (str fields as unicode,
    embeddings/labels float32). Raises ``ValueError`` with one clear message."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{source}: missing arrays {missing} (need {list(REQUIRED)})")
    out = dict(arrays)
    for k in STRING_FIELDS:
        out[k] = np.asarray(arrays[k]).astype(str)
    out["embeddings"] = np.asarray(arrays["embeddings"], np.float32)
    out["labels"] = np.asarray(arrays["labels"], np.float32)
    try:
        findings = check_findings(list(findings_of(arrays)), f"{source}: findings")
    except ManifestError as e:
        raise ValueError(str(e)) from None
    out["findings"] = np.asarray(findings, dtype=str)
    n = out["ids"].shape[0]
    emb, lab = out["embeddings"], out["labels"]
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{source}: embeddings must be [N={n}, d], got {emb.shape}")
    if lab.shape != (n, len(findings)):
        raise ValueError(
            f"{source}: labels must be [N={n}, {len(findings)}] "
            f"({', '.join(findings)}), got {lab.shape}"
        )
    for k in STRING_FIELDS:
        if out[k].shape != (n,):
            raise ValueError(f"{source}: {k} must be [N={n}], got {out[k].shape}")
    if "group" in arrays and np.asarray(arrays["group"]).shape != (n,):
        raise ValueError(
            f"{source}: group must be [N={n}], got {np.asarray(arrays['group']).shape}"
        )
    bad = sorted(set(out["modality"].tolist()) - set(MODALITIES))
    if bad:
        raise ValueError(f"{source}: modality must be one of {MODALITIES}, found {bad}")
    vals = lab[~np.isnan(lab)]
    if vals.size and not np.isin(vals, (-1.0, 0.0, 1.0)).all():
        raise ValueError(f"{source}: labels must be 1, 0, -1 (uncertain) or NaN (missing)")
    if not np.isfinite(emb).all():
        raise ValueError(f"{source}: embeddings contain NaN or inf")
    return out


def save_embeddings(path, **arrays) -> str:
    """Validates and writes ``arrays`` (see module doc) to ``path`` (``.npz``); returns the path."""
    out = validate(arrays, str(path))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    np.savez(path, **out)
    return str(path)


def load_embeddings(path) -> dict:
    """Reads and validates an embedding file; returns a dict of numpy arrays."""
    if not os.path.exists(path):
        raise ValueError(f"embedding file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read embedding file {path}: {e}") from None
    return validate(arrays, str(path))
