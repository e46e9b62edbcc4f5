"""Data configuration (numpy only): every data knob, its validation, and the static facts the
training code needs before the first batch (samples and views per step, bucket shapes).

Re-exported by :mod:`mmv_jax.data.pipeline`; see its docstring for the iterators.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os

import ml_collections
import numpy as np

from mmv_jax import paths
from mmv_jax.batch import PATCH, SEQ_MULTIPLE, WIRE_DTYPES
from mmv_jax.data import packing
from mmv_jax.data.manifest import Record, load_manifest
from mmv_jax.data.readers import DEFAULT_MAX_VOXELS
from mmv_jax.data.transforms import target_shape
from mmv_jax.errors import ConfigError

MODS = ("cxr", "ct")


def default_config() -> ml_collections.ConfigDict:
    """Every data knob. Defaults are the paper's stage 1 (256 CXR per step, views and sizes per
    METHOD.md); stages 2/3 set ``cxr_per_batch=192, ct_per_batch=64``. Override any field as
    ``--config.data.<field>=...``."""
    c = ml_collections.ConfigDict()
    c.manifest = ""  # JSONL manifest (data/manifest.py); an mmv-cache manifest works too
    c.cache_dir = ""  # if set, read DIR/manifest.jsonl written by `mmv-cache` instead
    c.train_splits = ("train",)
    c.eval_split = "val"
    c.cxr_per_batch = 256  # GLOBAL samples per step (all processes together)
    c.ct_per_batch = 0  # stages 2/3: 192 + 64
    c.shuffle_seed = -1  # -1: use make_train_iterator's `seed`
    c.views = ml_collections.ConfigDict(
        dict(
            n_global=2,
            n_local=8,
            global_scale=(0.3, 1.0),
            local_scale=(0.05, 0.3),
            long_side_2d=224,
            long_side_3d=112,
            flips=(
                0.5,
                0.0,
                0.0,
            ),  # probabilities: left-right, anterior-posterior, superior-inferior
        )
    )
    c.ct_window = (2500.0, 250.0)  # (width, level) HU
    c.buckets = ml_collections.ConfigDict(
        dict(
            seq_len=2048,  # tokens per row; multiple of 128 (attention kernel block)
            rows_2d=(),  # row counts of the 2D row group; () = automatic (bucket_rows)
            rows_3d=(),  # the same for the 3D (CT) row group
            max_shapes=4,  # at most this many step shapes (2D x 3D buckets) when automatic
            slots=128,  # view slots per row
            # shapes [Z, H, W] after resizing that the automatic choice assumes when the manifest
            # carries no `shape` fields (MIMIC-CXR portrait radiographs; CT-RATE chest CT)
            nominal_cxr_shape=(1, 224, 186),
            nominal_ct_shape=(98, 112, 112),
            auto_batches=48,
        )
    )
    c.rows_multiple_of = 1  # rows per process divisible by this (the local device count)
    # patch values on the wire (host memory, host-to-device copies): float32 | bfloat16 |
    # float16 | uint8 ([-1, 1] in 255 levels, mapped back on the device). bfloat16 changes
    # nothing where the model computes in bf16 (it casts the patches first).
    c.patch_dtype = "float32"
    c.worker_count = (
        0  # Grain worker processes (0: in the main process; -1: from the host, see workers())
    )
    c.worker_buffer_size = 1  # batches buffered per worker process
    c.read_threads = 1  # threads per process computing batches ahead (0: synchronous)
    c.prefetch = 1  # batches computed ahead per process
    c.max_bad_fraction = 0.01  # stop when bad files / files tried exceeds this
    c.max_bad_retries = 32  # substitutes tried for one sample before giving up
    c.min_files_for_bad_fraction = 1000  # the fraction is checked only after this many files
    # largest image a header may claim, in voxels (x samples per pixel), checked before anything
    # is allocated; 2**30 admits a 512 x 512 x 4096 CT (readers.DEFAULT_MAX_VOXELS)
    c.max_image_voxels = DEFAULT_MAX_VOXELS
    return c


def demo_config() -> ml_collections.ConfigDict:
    """Tiny CPU demo: 8 CXR + 4 CT per step, small images (long side 112 / 70), short rows."""
    c = default_config()
    c.cxr_per_batch = 8
    c.ct_per_batch = 4
    c.eval_split = "val"
    c.views.long_side_2d = 112
    c.views.long_side_3d = 70
    c.buckets.seq_len = 256
    c.buckets.slots = 64
    c.buckets.max_shapes = 4
    c.buckets.nominal_cxr_shape = (1, 112, 98)
    c.buckets.nominal_ct_shape = (64, 70, 70)
    c.worker_count = 0
    c.max_bad_fraction = 0.05
    return c


def _local_counts(cfg, process_count: int) -> tuple[int, int]:
    out = []
    for name in ("cxr_per_batch", "ct_per_batch"):
        n = int(cfg[name])
        if n < 0 or n % process_count:
            raise ConfigError(
                f"config data.{name}={n} must be >= 0 and divisible by the "
                f"process count {process_count}"
            )
        out.append(n // process_count)
    if sum(out) == 0:
        raise ConfigError("config: data.cxr_per_batch + data.ct_per_batch must be > 0")
    return out[0], out[1]


def max_view_tokens(cfg) -> tuple[int, int]:
    """Upper bounds on the tokens of one view ``(2D, 3D)``: the whole image at its long side
    (``(L2 // 14) ** 2``, ``(L3 // 14) ** 3``); no view, train or eval, is larger."""
    v = cfg.views
    return (max(1, v.long_side_2d // PATCH) ** 2, max(1, v.long_side_3d // PATCH) ** 3)


def validate_config(cfg, process_count: int = 1) -> None:
    """Raises one clear :class:`~mmv_jax.errors.ConfigError` for an unusable data config."""
    s = int(cfg.buckets.seq_len)
    if s <= 0 or s % SEQ_MULTIPLE:
        raise ConfigError(
            f"config data.buckets.seq_len={s} must be a positive multiple of "
            f"{SEQ_MULTIPLE} (attention kernel block size)"
        )
    n_cxr, n_ct = _local_counts(cfg, process_count)
    t2, t3 = max_view_tokens(cfg)
    need = max(t2 if n_cxr else 0, t3 if n_ct else 0)
    if need > s:
        raise ConfigError(
            f"config data.buckets.seq_len={s} is shorter than the largest view "
            f"({need} tokens); raise seq_len or lower views.long_side_*"
        )
    v = cfg.views
    for name in ("global_scale", "local_scale"):
        lo, hi = v[name]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"config data.views.{name}={tuple(v[name])} must satisfy 0 < lo <= hi <= 1"
            )
    if v.n_global < 1 or v.n_local < 0:
        raise ConfigError("config data.views needs n_global >= 1 and n_local >= 0")
    if int(cfg.buckets.slots) < 1:
        raise ConfigError("config data.buckets.slots must be >= 1")
    m = int(cfg.rows_multiple_of)
    for g in GROUPS:
        rows = tuple(cfg.buckets.get(f"rows_{g}", ()))
        if any(r <= 0 or r % m for r in rows):
            raise ConfigError(
                f"config data.buckets.rows_{g}={rows}: every row count must be a "
                f"positive multiple of rows_multiple_of={m}"
            )
    if int(cfg.buckets.max_shapes) < 1:
        raise ConfigError("config data.buckets.max_shapes must be >= 1")
    if cfg.patch_dtype not in WIRE_DTYPES:
        raise ConfigError(
            f"config data.patch_dtype={cfg.patch_dtype!r} must be one of {WIRE_DTYPES}"
        )
    # impossible values would otherwise surface later as a division by zero, an empty image or
    # a run that stops at the first bad file (or never does)
    for name in ("long_side_2d", "long_side_3d"):
        if int(v[name]) < 1:
            raise ConfigError(f"config data.views.{name}={v[name]} must be >= 1")
    flips = tuple(v.flips)
    if not 1 <= len(flips) <= 3 or not all(0 <= f <= 1 for f in flips):
        raise ConfigError(
            f"config data.views.flips={flips} must hold 1 to 3 probabilities in [0, 1]"
        )
    width, level = (float(x) for x in cfg.ct_window)
    if not (math.isfinite(width) and width > 0 and math.isfinite(level)):
        raise ConfigError(
            f"config data.ct_window={tuple(cfg.ct_window)} must be (width > 0, level), both finite"
        )
    if not 0 <= float(cfg.max_bad_fraction) <= 1:  # also refuses NaN
        raise ConfigError(f"config data.max_bad_fraction={cfg.max_bad_fraction} must be in [0, 1]")
    if int(cfg.get("min_files_for_bad_fraction", 0)) < 0:
        raise ConfigError(
            f"config data.min_files_for_bad_fraction={cfg.min_files_for_bad_fraction} must be >= 0"
        )
    if int(cfg.worker_count) < -1:
        raise ConfigError(f"config data.worker_count={cfg.worker_count} must be >= 0, or -1 (auto)")
    if int(cfg.max_bad_retries) < 0:
        raise ConfigError(f"config data.max_bad_retries={cfg.max_bad_retries} must be >= 0")
    if max_image_voxels(cfg) < 1:
        raise ConfigError(f"config data.max_image_voxels={max_image_voxels(cfg)} must be >= 1")


def workers(cfg, local_devices: int = 1) -> int:
    """``cfg.worker_count``, or for -1 one worker per CPU core this process may use, less one
    core for the training loop and one per local accelerator (their host threads), at least 1
    and at most 16 (each worker buffers whole batches in shared memory). A batch does not
    depend on it."""
    n = int(cfg.worker_count)
    if n >= 0:
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus - 1 - int(local_devices)))


def mp_prefetch(ds, cfg):
    """``mp_prefetch`` with ``cfg.worker_count`` processes (none for 0). Grain reads absl flags
    inside; an entry point that has not parsed them gets the defaults (grain issue 1355)."""
    n = workers(cfg)
    if n <= 0:
        return ds
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=n, per_worker_buffer_size=int(cfg.worker_buffer_size)
        )
    )


def max_image_voxels(cfg) -> int:
    """``cfg.max_image_voxels`` for ``load_image(..., max_voxels=)``; the readers' default for a
    config written before the key existed (an older run's ``config.json``)."""
    return int(cfg.get("max_image_voxels", DEFAULT_MAX_VOXELS))


def num_samples_global(cfg, process_count: int = 1) -> int:
    """Samples per step across all processes (fixed by the config)."""
    _local_counts(cfg, process_count)
    return int(cfg.cxr_per_batch) + int(cfg.ct_per_batch)


def num_views_per_sample(cfg) -> int:
    return int(cfg.views.n_global) + int(cfg.views.n_local)


def manifest_path(cfg) -> str:
    """``cfg.cache_dir/manifest.jsonl`` when a cache is configured (its long sides must match the
    config's), else ``cfg.manifest``."""
    if cfg.cache_dir:
        info_path = paths.resolve(cfg.cache_dir) / "cache_info.json"
        if not info_path.exists():
            raise ConfigError(
                f"config data.cache_dir={cfg.cache_dir}: no cache_info.json there; "
                f"build the cache with `mmv-cache --manifest M --out DIR`"
            )
        info = json.loads(info_path.read_text())
        want = (int(cfg.views.long_side_2d), int(cfg.views.long_side_3d))
        have = (info.get("long_side_2d"), info.get("long_side_3d"))
        if tuple(have) != want:
            raise ConfigError(
                f"cache {cfg.cache_dir} was built with long sides {have}, the config "
                f"asks for {want}; rebuild it with --long-side-2d/--long-side-3d"
            )
        return str(paths.resolve(cfg.cache_dir) / "manifest.jsonl")
    if not cfg.manifest:
        raise ConfigError(
            "config data.manifest is empty: point it at a JSONL manifest "
            "(e.g. the output of `mmv-demo-data --out DIR`: DIR/manifest.jsonl)"
        )
    return cfg.manifest


@functools.lru_cache(maxsize=16)
def _train_records(path: str, splits: tuple, mtime: float) -> tuple[tuple[Record, ...], ...]:
    recs = load_manifest(path, splits=splits)
    return tuple(tuple(r for r in recs if r.modality == m) for m in MODS)


def _records(cfg):
    path = manifest_path(cfg)
    splits = tuple(cfg.train_splits)
    mtime = os.path.getmtime(path) if not paths.is_uri(path) and os.path.exists(path) else 0.0
    return _train_records(path, splits, mtime)


def _resized_shape(rec: Record, cfg) -> tuple[int, int, int] | None:
    if rec.shape is None:
        return None
    if rec.preprocessed:
        return tuple(rec.shape)
    long_side = cfg.views.long_side_3d if rec.modality == "ct" else cfg.views.long_side_2d
    return target_shape(rec.shape, rec.spacing or (1.0, 1.0, 1.0), long_side)


def _view_kwargs(cfg) -> dict:
    v = cfg.views
    return dict(
        n_global=int(v.n_global),
        n_local=int(v.n_local),
        global_scale=tuple(v.global_scale),
        local_scale=tuple(v.local_scale),
    )


GROUPS = ("2d", "3d")  # the row groups of a train batch, one per modality (MODS order)


def groups_of(cfg, process_count: int = 1) -> tuple[str, ...]:
    """The row groups a train batch holds: ``"2d"`` when X-rays are drawn, ``"3d"`` for CT."""
    return tuple(g for g, n in zip(GROUPS, _local_counts(cfg, process_count)) if n)


@functools.lru_cache(maxsize=32)
def _auto_buckets(key: str) -> tuple[tuple[int, ...], ...]:
    k = json.loads(key)
    rng = np.random.default_rng(0)
    from mmv_jax.data.views import view_tokens

    needed = []
    for _ in range(k["n_batches"]):
        row = []
        for shapes, count in k["mods"]:
            # empirical: one random record shape per sample slot, redrawn for each batch
            sizes = []
            for i in rng.integers(0, len(shapes), count):
                sizes += view_tokens(rng, tuple(shapes[i]), **k["view_kwargs"])
            row.append(packing.rows_needed(sizes, k["seq_len"], k["slots"]))
        needed.append(row)
    return packing.choose_buckets(needed, k["max_shapes"], k["multiple_of"])


def bucket_rows(
    cfg, process_count: int = 1, shapes: dict | None = None
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """``(groups, buckets)``: the row groups of a train batch (``"2d"``, ``"3d"``, those drawn)
    and the step shapes the train iterator may emit on one process, each a row count per group.

    ``data.buckets.rows_2d`` / ``rows_3d`` when set give every combination of their counts;
    otherwise at most ``max_shapes`` shapes are chosen jointly (``packing.choose_buckets``)
    from view sizes drawn for the manifest's ``shape`` fields when present, else for
    ``nominal_*_shape`` (``shapes`` = ``{"cxr": [[Z, H, W], ...], "ct": [...]}`` overrides
    both, for benchmarks and planning)."""
    validate_config(cfg, process_count)
    groups = groups_of(cfg, process_count)
    counts = dict(zip(GROUPS, _local_counts(cfg, process_count)))
    fixed = [tuple(sorted(int(r) for r in cfg.buckets.get(f"rows_{g}", ()))) for g in groups]
    if all(fixed):
        return groups, tuple(sorted(itertools.product(*fixed), key=sum))
    if any(fixed):
        raise ConfigError(
            f"config data.buckets: set rows_2d and rows_3d for every group drawn "
            f"({', '.join(groups)}), or neither"
        )
    nominal = {
        "cxr": tuple(cfg.buckets.nominal_cxr_shape),
        "ct": tuple(cfg.buckets.nominal_ct_shape),
    }
    try:
        recs = _records(cfg) if shapes is None else ((), ())
    except (ValueError, OSError):
        recs = ((), ())
    mods = []
    for g, m, rs in zip(GROUPS, MODS, recs):
        if g not in groups:
            continue
        if shapes is not None and shapes.get(m):
            found = [tuple(int(v) for v in x) for x in shapes[m]]
        else:
            found = [
                x for x in (_resized_shape(r, cfg) for r in rs[:: max(1, len(rs) // 2000)]) if x
            ]
        mods.append((found if found else [nominal[m]], counts[g]))  # empirical, with multiplicity
    key = json.dumps(
        dict(
            mods=mods,
            seq_len=int(cfg.buckets.seq_len),
            slots=int(cfg.buckets.slots),
            max_shapes=int(cfg.buckets.max_shapes),
            multiple_of=int(cfg.rows_multiple_of),
            view_kwargs=_view_kwargs(cfg),
            n_batches=int(cfg.buckets.auto_batches),
        ),
        sort_keys=True,
    )
    return groups, _auto_buckets(key)


def bucket_shapes(cfg, process_count: int = 1) -> list[tuple[tuple[int, int, int, int], ...]]:
    """Every train step shape on one process: a tuple of ``(rows, seq_len, slots, patch_dim)``,
    one per row group (2D rows ``P*P`` wide, 3D rows ``P**3``)."""
    s, v = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    groups, buckets = bucket_rows(cfg, process_count)
    return [
        tuple((r, s, v, packing.patch_dim_for(g == "3d")) for g, r in zip(groups, rows))
        for rows in buckets
    ]
