"""Small builders shared by the train tests."""

import numpy as np

from mmv_jax.batch import PATCH, PackedBatch, groups
from mmv_jax.data.packing import pack_into as pack_views
from mmv_jax.data.patches import make_view


def synthetic_batch(
    num_samples=4, n_global=2, n_local=2, rows=2, seq_len=128, slots=12, seed=0, sample_offset=0
):
    """Packed views of random 2D and 3D 'images' (every other sample 3D)."""
    rng = np.random.default_rng(seed)
    views = []
    for s in range(num_samples):
        for i in range(n_global + n_local):
            g = 2 if i < n_global else 1
            shape = (14 * g, 14 * g, 14) if s % 2 else (1, 14 * (g + 1), 14 * g)
            views.append(
                make_view(
                    rng.uniform(-1, 1, shape).astype(np.float32),
                    sample=s + sample_offset,
                    is_global=i < n_global,
                    index=i,
                )
            )
    return pack_views(views, rows, seq_len, slots)


def join_groups(batch) -> PackedBatch:
    """A train batch's row groups as one PackedBatch (rows in order, patches float32 zero-padded
    to ``P**3``): the old one-group layout, for checks on the content."""
    parts = groups(batch)
    pad = lambda p: np.pad(np.asarray(p, np.float32), [(0, 0), (0, 0), (0, PATCH**3 - p.shape[-1])])
    return PackedBatch(
        *(
            np.concatenate([pad(f) if name == "patches" else np.asarray(f) for f in fields])
            for name, fields in zip(PackedBatch._fields, zip(*parts))
        )
    )


def same_batch(a, b) -> bool:
    """Bit-identical batches (one PackedBatch or row groups)."""
    ga, gb = groups(a), groups(b)
    return len(ga) == len(gb) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
        for pa, pb in zip(ga, gb)
        for x, y in zip(pa, pb)
    )


def tiny_config(**overrides):
    import configs.base as base

    c = base.get_config()
    c.model.variant = "Ti/14"
    c.model.dtype = "float32"
    c.model.proj_hidden = 64
    c.model.proj_dim = 16
    c.model.max_segment_len = 0
    c.loss.num_slices = 32
    c.optim.warmup_steps = 2
    c.total_steps = 10
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


# Identifier-like text that tests write into DICOM tags a reader parses; it must never reach a
# message, a log or a file.
MRN = "MRN-TEST-12345"


def put_raw_tag(ds, keyword, text):
    """Stores ``text`` as the raw bytes of ``keyword`` (pydicom would refuse it as a value: this
    is how identifier text in the wrong tag looks in a real file)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    raw = text.encode()
    raw += b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def write_csv(path, header, rows, gz=False):
    """A CSV (``gz``: ``path.gz``) with ``header`` and ``rows``, as the public releases ship them."""
    import csv
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def load_build_manifest():
    """``tools/build_manifest.py`` as a module (tools/ is not a package)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "build_manifest",
        os.path.join(os.path.dirname(__file__), "..", "tools", "build_manifest.py"),
    )
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    return bm
