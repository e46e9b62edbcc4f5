"""One path layer for run folders, manifests and caches: local paths and remote URIs alike.

Everything goes through ``etils.epath`` (the layer Orbax itself uses), so ``gs://bucket/run``
reaches checkpoints, metrics, TensorBoard and configs untouched. A URI is never joined to the
current directory; ``file://`` URIs become local paths (epath has no ``file://`` backend);
relative local paths become absolute.
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path) -> bool:
    return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
    """``path`` (str, ``os.PathLike`` or ``epath.Path``) as an absolute ``epath.Path``."""
    s = os.fspath(path)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if is_uri(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(s))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Readers never see a half-written file: a local file is written beside and renamed; a
    remote object store replaces an object whole on upload."""
    if is_uri(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
