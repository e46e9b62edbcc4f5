"""The data pipeline (host side, numpy + Grain; never JAX): manifest -> PackedBatch iterators.

Public API (what the training and evaluation code calls):

- :func:`default_config` / :func:`demo_config`: every data knob as an ``ml_collections.ConfigDict``
  (embedded as ``config.data``).
- :func:`make_train_iterator` ``(cfg, *, seed, process_index=0, process_count=1)`` -> a Grain
  ``DatasetIterator`` (``get_state()``/``set_state()``; works with
  ``grain.checkpoint.CheckpointSave/CheckpointRestore`` in an Orbax ``Composite``) yielding
  ``(batch: PackedBatch, stats: dict)``. ``batch`` holds this process's rows (numpy); its
  ``view_sample`` holds GLOBAL sample indices ``process_index * local_samples + i`` (local order:
  this process's CXR samples, then its CT samples). ``stats`` holds numpy scalars
  ``packing_efficiency``, ``real_tokens``, ``rows``, ``bad_files`` (cumulative count on this
  process), ``bad_in_batch``, ``samples``, ``step``.
- :func:`make_eval_iterator` ``(cfg, manifest_path_or_records, *, split=None, batch_size, ...)``
  yielding ``(batch, ids)``: one deterministic whole-image view per image (``view_index`` 0,
  global, ``view_sample`` = position in ``ids``).
- :func:`num_samples_global`, :func:`num_views_per_sample`, :func:`bucket_shapes`.

Determinism: each modality is a stream of global positions ``q = step * n_global + j``; position
``q`` reads record ``perm_e[q % N]`` of epoch ``e = q // N`` (a seeded permutation per epoch and
modality) and draws its views from ``np.random.default_rng([seed, modality, q, attempt])``.
Process ``p`` of ``P`` builds positions ``j in [p * n_local, (p + 1) * n_local)``. A bad file
(:class:`~mmv_jax.data.readers.ImageReadError`) is replaced by a seeded substitute
(``attempt + 1``), so every batch holds exactly the configured counts; the bad paths travel with the
batch and are counted, logged once and checked against ``max_bad_fraction`` in the consuming
process. A batch is a pure function of ``(config, seed, step, process)``, so the iterator state is
the step index (plus the bad-file counters) and restores exactly, for any ``worker_count``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from mmv_jax.batch import PATCH, PackedBatch, View, empty_batch, pack_rows
from mmv_jax.data import packing
from mmv_jax.data.manifest import Record, load_manifest
from mmv_jax.data.readers import ImageReadError, load_image
from mmv_jax.data.transforms import preprocess, target_shape
from mmv_jax.data.views import sample_views, whole_view

log = logging.getLogger(__name__)
MODS = ("cxr", "ct")
KERNEL_BLOCK = 128


# ---------------------------------------------------------------- config

def default_config() -> ml_collections.ConfigDict:
    """Every data knob (the paper's stage-3 style defaults; stage 1 sets ``ct_per_batch=0``)."""
    c = ml_collections.ConfigDict()
    c.manifest = ""              # JSONL manifest (data/manifest.py); an mmv-cache manifest works too
    c.cache_dir = ""             # if set, read DIR/manifest.jsonl written by `mmv-cache` instead
    c.train_splits = ("train",)
    c.eval_split = "val"
    c.cxr_per_batch = 256        # GLOBAL samples per step (all processes together)
    c.ct_per_batch = 0           # stages 2/3: 192 + 64
    c.shuffle_seed = -1          # -1: use make_train_iterator's `seed`
    c.views = ml_collections.ConfigDict(dict(
        n_global=2, n_local=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3),
        long_side_2d=224, long_side_3d=112,
        flips=(0.5, 0.0, 0.0),   # probabilities: left-right, anterior-posterior, superior-inferior
    ))
    c.ct_window = (2500.0, 250.0)  # (width, level) HU
    c.buckets = ml_collections.ConfigDict(dict(
        seq_len=2048,            # tokens per row; multiple of 128 (attention kernel block)
        rows=(),                 # row counts; () = chosen automatically (see packing.auto_bucket_rows)
        max_shapes=4,            # at most this many row counts when automatic
        slots=128,               # view slots per row
        # shapes [Z, H, W] after resizing that the automatic choice assumes when the manifest
        # carries no `shape` fields (MIMIC-CXR portrait radiographs; CT-RATE chest CT)
        nominal_cxr_shape=(1, 224, 186),
        nominal_ct_shape=(98, 112, 112),
        auto_batches=48,
    ))
    c.rows_multiple_of = 1       # rows per process divisible by this (the local device count)
    c.patch_dtype = "float32"    # or "float16" to halve host memory of mixed (P^3-wide) batches
    c.worker_count = 0           # Grain worker processes (0: in the main process); part of the run config
    c.worker_buffer_size = 1     # batches buffered per worker process
    c.read_threads = 1           # threads per process computing batches ahead (0: synchronous)
    c.prefetch = 1               # batches computed ahead per process
    c.max_bad_fraction = 0.01    # stop when bad files / files tried exceeds this
    c.max_bad_retries = 32       # substitutes tried for one sample before giving up
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
            raise ValueError(f"config data.{name}={n} must be >= 0 and divisible by the "
                             f"process count {process_count}")
        out.append(n // process_count)
    if sum(out) == 0:
        raise ValueError("config: data.cxr_per_batch + data.ct_per_batch must be > 0")
    return out[0], out[1]


def _max_view_tokens(cfg) -> tuple[int, int]:
    v = cfg.views
    return (max(1, v.long_side_2d // PATCH) ** 2, max(1, v.long_side_3d // PATCH) ** 3)


def validate_config(cfg, process_count: int = 1) -> None:
    """Raises one clear ``ValueError`` for an unusable data config."""
    s = int(cfg.buckets.seq_len)
    if s <= 0 or s % KERNEL_BLOCK:
        raise ValueError(f"config data.buckets.seq_len={s} must be a positive multiple of "
                         f"{KERNEL_BLOCK} (attention kernel block size)")
    n_cxr, n_ct = _local_counts(cfg, process_count)
    t2, t3 = _max_view_tokens(cfg)
    need = max(t2 if n_cxr else 0, t3 if n_ct else 0)
    if need > s:
        raise ValueError(f"config data.buckets.seq_len={s} is shorter than the largest view "
                         f"({need} tokens); raise seq_len or lower views.long_side_*")
    v = cfg.views
    for name in ("global_scale", "local_scale"):
        lo, hi = v[name]
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"config data.views.{name}={tuple(v[name])} must satisfy 0 < lo <= hi <= 1")
    if v.n_global < 1 or v.n_local < 0:
        raise ValueError("config data.views needs n_global >= 1 and n_local >= 0")
    if int(cfg.buckets.slots) < 1:
        raise ValueError("config data.buckets.slots must be >= 1")
    m = int(cfg.rows_multiple_of)
    for r in cfg.buckets.rows:
        if r <= 0 or r % m:
            raise ValueError(f"config data.buckets.rows={tuple(cfg.buckets.rows)}: every row "
                             f"count must be a positive multiple of rows_multiple_of={m}")
    if len(cfg.buckets.rows) > 0 and len(cfg.buckets.rows) > max(4, cfg.buckets.max_shapes):
        raise ValueError("config data.buckets.rows lists more shapes than max_shapes")
    if cfg.patch_dtype not in ("float32", "float16"):
        raise ValueError("config data.patch_dtype must be 'float32' or 'float16'")


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
        info_path = os.path.join(cfg.cache_dir, "cache_info.json")
        if not os.path.exists(info_path):
            raise ValueError(f"config data.cache_dir={cfg.cache_dir}: no cache_info.json there; "
                             f"build the cache with `mmv-cache --manifest M --out DIR`")
        with open(info_path) as f:
            info = json.load(f)
        want = (int(cfg.views.long_side_2d), int(cfg.views.long_side_3d))
        have = (info.get("long_side_2d"), info.get("long_side_3d"))
        if tuple(have) != want:
            raise ValueError(f"cache {cfg.cache_dir} was built with long sides {have}, the config "
                             f"asks for {want}; rebuild it with --long-side-2d/--long-side-3d")
        return os.path.join(cfg.cache_dir, "manifest.jsonl")
    if not cfg.manifest:
        raise ValueError("config data.manifest is empty: point it at a JSONL manifest "
                         "(e.g. the output of `mmv-demo-data --out DIR`: DIR/manifest.jsonl)")
    return cfg.manifest


@functools.lru_cache(maxsize=16)
def _train_records(path: str, splits: tuple, mtime: float) -> tuple[tuple[Record, ...], ...]:
    recs = load_manifest(path, splits=splits)
    return tuple(tuple(r for r in recs if r.modality == m) for m in MODS)


def _records(cfg):
    path = manifest_path(cfg)
    splits = tuple(cfg.train_splits)
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
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
    return dict(n_global=int(v.n_global), n_local=int(v.n_local),
                global_scale=tuple(v.global_scale), local_scale=tuple(v.local_scale))


@functools.lru_cache(maxsize=32)
def _auto_rows(key: str) -> tuple[int, ...]:
    k = json.loads(key)
    rng = np.random.default_rng(0)
    shapes_counts = []
    for shapes, count in k["mods"]:
        if count == 0:
            continue
        # empirical: one random record shape per sample slot, redrawn for each batch
        shapes_counts.append(([tuple(s) for s in shapes], count))
    needed = []
    from mmv_jax.data.views import view_tokens
    for _ in range(k["n_batches"]):
        sizes = []
        for shapes, count in shapes_counts:
            for i in rng.integers(0, len(shapes), count):
                sizes += view_tokens(rng, shapes[i], **k["view_kwargs"])
        needed.append(packing.rows_needed(sizes, k["seq_len"], k["slots"]))
    return packing.choose_rows(needed, k["max_shapes"], k["multiple_of"])


def bucket_rows(cfg, process_count: int = 1) -> tuple[int, ...]:
    """The row counts the train iterator may emit (configured, or chosen automatically from the
    manifest's ``shape`` fields when present, else from ``nominal_*_shape``)."""
    validate_config(cfg, process_count)
    if len(cfg.buckets.rows):
        return tuple(sorted(int(r) for r in cfg.buckets.rows))
    n_cxr, n_ct = _local_counts(cfg, process_count)
    nominal = {"cxr": tuple(cfg.buckets.nominal_cxr_shape), "ct": tuple(cfg.buckets.nominal_ct_shape)}
    mods = []
    try:
        recs = _records(cfg)
    except (ValueError, OSError):
        recs = ((), ())
    for m, n, rs in zip(MODS, (n_cxr, n_ct), recs):
        shapes = [s for s in (_resized_shape(r, cfg) for r in rs[:: max(1, len(rs) // 2000)]) if s]
        mods.append((sorted(set(shapes)) if shapes else [nominal[m]], n))
    key = json.dumps(dict(mods=mods, seq_len=int(cfg.buckets.seq_len), slots=int(cfg.buckets.slots),
                          max_shapes=int(cfg.buckets.max_shapes), multiple_of=int(cfg.rows_multiple_of),
                          view_kwargs=_view_kwargs(cfg), n_batches=int(cfg.buckets.auto_batches)),
                     sort_keys=True)
    return _auto_rows(key)


def bucket_shapes(cfg, process_count: int = 1) -> list[tuple[int, int, int, int]]:
    """Every ``(rows, seq_len, slots, patch_dim)`` the train iterator may emit on one process."""
    _, n_ct = _local_counts(cfg, process_count)
    pd = packing.patch_dim_for(n_ct > 0)
    s, v = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    return [(r, s, v, pd) for r in bucket_rows(cfg, process_count)]


# ---------------------------------------------------------------- per-sample work

def prepare_views(rec: Record, rng: np.random.Generator, sample: int, cfg_views, ct_window
                  ) -> list[View]:
    """Reads one record and draws its views (raises ImageReadError for a bad file)."""
    img = load_image(rec.path, **rec.read_kwargs())
    is_ct = rec.modality == "ct"
    if is_ct and img.array.shape[0] == 1:
        raise ImageReadError(rec.path, "manifest says ct but the image is 2D")
    if not is_ct and img.array.shape[0] != 1:
        raise ImageReadError(rec.path, f"manifest says cxr but the image is 3D {img.array.shape}")
    long_side = cfg_views["long_side_3d"] if is_ct else cfg_views["long_side_2d"]
    image = preprocess(img.array, img.spacing, rec.modality, long_side=long_side,
                       resized=rec.preprocessed, window=ct_window)
    return sample_views(image, rng, sample=sample, modality=int(is_ct),
                        n_global=cfg_views["n_global"], n_local=cfg_views["n_local"],
                        global_scale=cfg_views["global_scale"], local_scale=cfg_views["local_scale"],
                        flips=cfg_views["flips"])


class _TrainSource:
    """Random-access source: ``source[step]`` is this process's packed batch of that step."""

    def __init__(self, cfg, seed: int, process_index: int, process_count: int):
        validate_config(cfg, process_count)
        self.records = _records(cfg)
        self.local = _local_counts(cfg, process_count)
        self.glob = (int(cfg.cxr_per_batch), int(cfg.ct_per_batch))
        for m, n, rs in zip(MODS, self.local, self.records):
            if n and not rs:
                raise ValueError(f"no {m} records in splits {tuple(cfg.train_splits)} of "
                                 f"{manifest_path(cfg)}, but the config asks for {n} per batch")
        self.seed = int(seed)
        self.pi, self.pc = int(process_index), int(process_count)
        self.views = dict(_view_kwargs(cfg), long_side_2d=int(cfg.views.long_side_2d),
                          long_side_3d=int(cfg.views.long_side_3d), flips=tuple(cfg.views.flips))
        self.window = tuple(cfg.ct_window)
        self.rows = bucket_rows(cfg, process_count)
        self.seq_len, self.slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
        self.patch_dim = packing.patch_dim_for(self.local[1] > 0)
        self.dtype = np.dtype(cfg.patch_dtype)
        self.retries = int(cfg.max_bad_retries)
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self):
        return sys.maxsize

    def _index(self, m: int, q: int, attempt: int) -> int:
        n = len(self.records[m])
        if attempt:
            return int(np.random.default_rng([self.seed, m, q, attempt, 1]).integers(n))
        epoch = q // n
        key = (m, epoch)
        if key not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[key] = np.random.default_rng([self.seed, m, epoch]).permutation(n)
        return int(self._perm[key][q % n])

    def __getitem__(self, step: int):
        step = int(step)
        views: list[View] = []
        bad: list[tuple[str, str]] = []
        tried = 0
        offset = self.pi * sum(self.local)
        for m in range(2):
            n_local, n_glob = self.local[m], self.glob[m]
            for i in range(n_local):
                q = step * n_glob + self.pi * n_local + i
                sample = offset + i + (self.local[0] if m == 1 else 0)
                for attempt in range(self.retries + 1):
                    rec = self.records[m][self._index(m, q, attempt)]
                    rng = np.random.default_rng([self.seed, m, q, attempt])
                    tried += 1
                    try:
                        views += prepare_views(rec, rng, sample, self.views, self.window)
                        break
                    except ImageReadError as e:
                        bad.append((e.path, e.reason))
                else:
                    raise RuntimeError(
                        f"{self.retries + 1} files in a row failed to load for one {MODS[m]} sample; "
                        f"first bad: {bad[:5]}")
        batch, info = packing.pack_batch(views, self.rows, self.seq_len, self.slots, self.patch_dim)
        if self.dtype != np.float32:
            batch = batch._replace(patches=batch.patches.astype(self.dtype))
        info.update(step=np.int64(step), tried=np.int64(tried),
                    bad_paths=json.dumps(bad))  # a string: cheap to ship between processes
        return batch, info


# ---------------------------------------------------------------- the iterator with bad-file accounting

class _TrainIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float,
                 samples_per_batch: int):
        super().__init__(parent)
        self._max_bad = float(max_bad_fraction)
        self._samples = samples_per_batch
        self._bad = 0
        self._tried = 0
        self._first_bad: list[list[str]] = []
        self._logged: set[str] = set()

    def __next__(self):
        batch, info = next(self._parent)
        bad = json.loads(info["bad_paths"])
        self._bad += len(bad)
        self._tried += int(info["tried"])
        for path, reason in bad:
            if path not in self._logged:
                self._logged.add(path)
                log.warning("skipping bad file %s: %s", path, reason)
            if len(self._first_bad) < 20:
                self._first_bad.append([path, reason])
        if self._bad > self._max_bad * self._tried:
            listing = "\n  ".join(f"{p}: {r}" for p, r in self._first_bad[:10])
            raise RuntimeError(
                f"too many bad files: {self._bad} of {self._tried} tried "
                f"({self._bad / self._tried:.1%} > data.max_bad_fraction="
                f"{self._max_bad:g}). First bad files:\n  {listing}")
        stats = dict(packing_efficiency=np.float32(info["packing_efficiency"]),
                     real_tokens=np.int64(info["real_tokens"]), rows=np.int64(info["rows"]),
                     bad_files=np.int64(self._bad), bad_in_batch=np.int64(len(bad)),
                     samples=np.int64(self._samples), step=np.int64(info["step"]))
        return batch, stats

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "bad_files": self._bad,
                "tried": self._tried, "first_bad": list(self._first_bad)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._bad = int(state["bad_files"])
        self._tried = int(state["tried"])
        self._first_bad = [list(x) for x in state["first_bad"]]

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


class _TrainDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, samples: int):
        super().__init__(parent)
        self._max_bad = max_bad_fraction
        self._samples = samples

    def __iter__(self):
        return _TrainIterator(self._parent.__iter__(), self._max_bad, self._samples)


def _mp_prefetch(ds: grain.IterDataset, cfg) -> grain.IterDataset:
    """``mp_prefetch`` with ``cfg.worker_count`` processes (none for 0). Grain reads absl flags
    inside; an entry point that has not parsed them gets the defaults (grain issue 1355)."""
    if int(cfg.worker_count) <= 0:
        return ds
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg.worker_count), per_worker_buffer_size=int(cfg.worker_buffer_size)))


def make_train_dataset(cfg, *, seed: int, process_index: int = 0, process_count: int = 1
                       ) -> grain.IterDataset:
    """The Grain ``IterDataset`` behind :func:`make_train_iterator`."""
    seed = int(cfg.shuffle_seed) if int(cfg.shuffle_seed) >= 0 else int(seed)
    src = _TrainSource(cfg, seed, process_index, process_count)
    ds = grain.MapDataset.source(src)
    threads = int(cfg.read_threads)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(1, int(cfg.prefetch))))
    ds = _mp_prefetch(ds, cfg)
    return _TrainDataset(ds, float(cfg.max_bad_fraction), sum(src.local))


def make_train_iterator(cfg, *, seed: int, process_index: int = 0, process_count: int = 1):
    """A checkpointable Grain ``DatasetIterator`` over ``(PackedBatch, stats)`` (module docstring).

    With ``cfg.worker_count > 0`` the batches are built in Grain worker processes
    (``mp_prefetch``); call ``absl.flags`` parsing (or ``app.run``) in the entry point first, and
    ``iterator.close()`` when done.
    """
    return iter(make_train_dataset(cfg, seed=seed, process_index=process_index,
                                   process_count=process_count))


# ---------------------------------------------------------------- evaluation

class _EvalSource:
    def __init__(self, records, cfg, batch_size, seq_len, slots, patch_dim, rows):
        self.records, self.bs = records, int(batch_size)
        self.views = dict(long_side_2d=int(cfg.views.long_side_2d),
                          long_side_3d=int(cfg.views.long_side_3d))
        self.window = tuple(cfg.ct_window)
        self.seq_len, self.slots, self.patch_dim, self.rows = seq_len, slots, patch_dim, rows

    def __len__(self):
        return math.ceil(len(self.records) / self.bs)

    def __getitem__(self, b):
        views, ids = [], []
        for rec in self.records[b * self.bs:(b + 1) * self.bs]:
            try:
                img = load_image(rec.path, **rec.read_kwargs())
            except ImageReadError as e:
                log.warning("skipping bad file %s: %s", e.path, e.reason)
                continue
            ls = self.views["long_side_3d" if rec.modality == "ct" else "long_side_2d"]
            image = preprocess(img.array, img.spacing, rec.modality, long_side=ls,
                               resized=rec.preprocessed, window=self.window)
            views.append(whole_view(image, sample=len(ids), modality=int(rec.modality == "ct")))
            ids.append(rec.id)
        rows = packing.ffd_rows([v.num_tokens for v in views], self.seq_len, self.slots)
        rows += [[] for _ in range(self.rows - len(rows))]
        batch = pack_rows([[views[i] for i in r] for r in rows], self.seq_len, self.slots,
                          self.patch_dim)
        return batch, ids


def eval_batch_shape(cfg, batch_size: int, has_3d: bool) -> tuple[int, int, int, int]:
    """``(rows, seq_len, slots, patch_dim)`` of every eval batch: rows for the worst case (each
    whole image at its largest token count), so one shape per eval set."""
    s, slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    t2, t3 = _max_view_tokens(cfg)
    per_row = max(1, min(slots, s // (t3 if has_3d else t2)))
    rows = math.ceil(batch_size / per_row)
    m = int(cfg.rows_multiple_of)
    return int(math.ceil(rows / m) * m), s, slots, packing.patch_dim_for(has_3d)


def make_eval_iterator(cfg, manifest_path_or_records, *, split: str | None = None,
                       batch_size: int, process_index: int = 0, process_count: int = 1):
    """Iterator of ``(batch, ids)`` with one deterministic whole-image view per image.

    ``manifest_path_or_records``: a manifest path or a list of :class:`Record`. ``split``
    filters records (``None``: all). Process ``p`` takes records ``p::process_count``. Unreadable
    files are skipped (logged); ``ids`` lists the images in the batch, and ``view_sample`` is the
    position in ``ids``. Every batch has the shape :func:`eval_batch_shape` (the last one may hold
    fewer images).
    """
    if isinstance(manifest_path_or_records, (str, os.PathLike)):
        records = load_manifest(manifest_path_or_records, splits=split)
    else:
        records = [r for r in manifest_path_or_records if split is None or r.split == split]
    records = records[process_index::process_count]
    has_3d = any(r.modality == "ct" for r in records)
    rows, s, slots, pd = eval_batch_shape(cfg, batch_size, has_3d)
    t2, t3 = _max_view_tokens(cfg)
    if (t3 if has_3d else t2) > s:
        raise ValueError(f"config data.buckets.seq_len={s} is shorter than a whole image "
                         f"({t3 if has_3d else t2} tokens)")
    src = _EvalSource(records, cfg, batch_size, s, slots, pd, rows)
    ds = grain.MapDataset.source(src).to_iter_dataset(
        grain.ReadOptions(num_threads=int(cfg.read_threads), prefetch_buffer_size=max(1, int(cfg.prefetch))))
    return iter(_mp_prefetch(ds, cfg))
