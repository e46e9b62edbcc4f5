"""The data pipeline (host side, numpy + Grain; never JAX): manifest -> PackedBatch iterators.

Public API (what the training and evaluation code calls):

- :func:`default_config` / :func:`demo_config`: every data knob as an ``ml_collections.ConfigDict``
  (embedded as ``config.data``).
- :func:`make_train_iterator` ``(cfg, *, seed, process_index=0, process_count=1, gather=None)``
  -> a Grain ``DatasetIterator`` (``get_state()``/``set_state()``: a small JSON dict, the same on
  every process) yielding ``(batch, stats)``. ``batch`` is a tuple of PackedBatches, one row
  group per modality drawn (2D rows ``P*P`` wide, then 3D rows ``P**3`` wide; patches in
  ``patch_dtype``), this process's rows (numpy); its ``view_sample`` holds GLOBAL sample indices
  ``process_index * local_samples + i`` (local order: this process's CXR samples, then its CT
  samples). With several processes, ``gather`` (``[k]`` -> ``[P, k]``, an all-gather) lets them
  agree on one bucket per group and step. ``stats`` (host-only) holds numpy scalars over ALL
  processes: ``packing_efficiency``, ``real_tokens``, ``capacity_tokens``, ``rows``,
  ``wire_bytes``, ``bad_files`` (cumulative), ``bad_in_batch``; and ``samples`` (this
  process's), ``step``, ``agree_s`` (seconds spent agreeing with the other processes),
  ``build_s`` (seconds one worker spent building this process's batch).
- :func:`make_eval_iterator` ``(cfg, manifest_path_or_records, *, split=None, batch_size, ...)``
  yielding ``(batch, ids)``: one deterministic whole-image view per image (``view_index`` 0,
  global, ``view_sample`` = position in ``ids``).
- :func:`num_samples_global`, :func:`num_views_per_sample`, :func:`bucket_shapes` (train),
  :func:`eval_batch_shape` (eval), :func:`max_view_tokens`, :func:`manifest_path` (the manifest
  actually read: ``cache_dir``'s when set).

Determinism: each modality is a stream of global positions ``q = step * n_global + j``; position
``q`` reads record ``perm_e[q % N]`` of epoch ``e = q // N`` (a seeded permutation per epoch and
modality) and draws its views from ``np.random.default_rng([seed, modality, q, attempt])``.
Process ``p`` of ``P`` builds positions ``j in [p * n_local, (p + 1) * n_local)``. A bad file
(:class:`~mmv_jax.data.readers.ImageReadError`) is replaced by a seeded substitute
(``attempt + 1``), so every batch holds exactly the configured counts; the bad paths travel with the
batch, are logged once by the process that met them, and are counted over all processes against
``max_bad_fraction``. A batch is a pure function of ``(config, seed, step, process)`` (the same for
any ``worker_count``), up to the bucket padding that the processes agree on; so the iterator state
is the step index plus the global bad-file counters, and it restores exactly into a fresh
iterator, process or topology.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import grain
import numpy as np

from mmv_jax.batch import View, nbytes, wire_dtype
from mmv_jax.data import packing
from mmv_jax.data.config import (  # noqa: F401  (re-exported: the public API lives here)
    GROUPS,
    MODS,
    _local_counts,
    _records,
    _view_kwargs,
    bucket_rows,
    bucket_shapes,
    default_config,
    demo_config,
    groups_of,
    manifest_path,
    max_image_voxels,
    max_view_tokens,
    mp_prefetch,
    num_samples_global,
    num_views_per_sample,
    validate_config,
    workers,
)
from mmv_jax.data.eval_iterator import eval_batch_shape, make_eval_iterator  # noqa: F401  (re-exported)
from mmv_jax.data.manifest import Record
from mmv_jax.data.readers import ImageReadError, file_errors
from mmv_jax.data.transforms import load_preprocessed
from mmv_jax.data.views import sample_views
from mmv_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- per-sample work


def prepare_views(
    rec: Record,
    rng: np.random.Generator,
    sample: int,
    cfg_views,
    ct_window,
    max_voxels: int | None = None,
) -> list[View]:
    """Reads one record and draws its views. Any failure of this one file, whatever raised it,
    is an ImageReadError naming it (a bad file to skip), never another exception."""
    image = load_preprocessed(
        rec,
        long_side_2d=cfg_views["long_side_2d"],
        long_side_3d=cfg_views["long_side_3d"],
        ct_window=ct_window,
        max_voxels=max_voxels,
    )
    with file_errors(rec.path, "view sampling"):
        return sample_views(
            image,
            rng,
            sample=sample,
            modality=int(rec.modality == "ct"),
            n_global=cfg_views["n_global"],
            n_local=cfg_views["n_local"],
            global_scale=cfg_views["global_scale"],
            local_scale=cfg_views["local_scale"],
            flips=cfg_views["flips"],
        )


_ONE_BLAS_THREAD = []


def use_one_blas_thread() -> None:
    """Sets numpy's BLAS to one thread for this process (once; never restored: a process-wide
    setting cannot be restored safely while other threads build batches). The resizes are small
    matmuls, and Grain workers that each run OpenBLAS with a thread per core oversubscribe the
    host: they build batches several times slower than with one thread each. The in-process
    pipeline does the same, so a batch is bit-identical whatever the worker count."""
    if not _ONE_BLAS_THREAD:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        _ONE_BLAS_THREAD.append(True)


class _TrainSource:
    """Random-access source: ``source[step]`` is this process's packed batch of that step."""

    def __init__(self, cfg, seed: int, process_index: int, process_count: int):
        validate_config(cfg, process_count)
        self.records = _records(cfg)
        self.local = _local_counts(cfg, process_count)
        self.glob = (int(cfg.cxr_per_batch), int(cfg.ct_per_batch))
        for m, n, rs in zip(MODS, self.local, self.records):
            if n and not rs:
                raise ConfigError(
                    f"no {m} records in splits {tuple(cfg.train_splits)} of "
                    f"{manifest_path(cfg)}, but the config asks for {n} per batch"
                )
        self.seed = int(seed)
        self.pi, self.pc = int(process_index), int(process_count)
        self.views = dict(
            _view_kwargs(cfg),
            long_side_2d=int(cfg.views.long_side_2d),
            long_side_3d=int(cfg.views.long_side_3d),
            flips=tuple(cfg.views.flips),
        )
        self.window = tuple(cfg.ct_window)
        self.groups, self.rows = bucket_rows(cfg, process_count)
        self.seq_len, self.slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
        self.dtype = wire_dtype(cfg.patch_dtype)
        self.retries = int(cfg.max_bad_retries)
        self.max_voxels = max_image_voxels(cfg)
        self._perm: dict[tuple[int, int], np.ndarray] = {}
        self._known_bad: set[str] = set()  # this worker's bad files, never drawn again

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
        use_one_blas_thread()
        t0 = time.perf_counter()
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
                    if rec.path in self._known_bad:
                        # seen bad before: the next substitute, without reading or counting it
                        # again (the same draw as after a fresh failure, so the batch does not
                        # depend on which worker saw the file first)
                        continue
                    rng = np.random.default_rng([self.seed, m, q, attempt])
                    tried += 1
                    try:
                        views += prepare_views(
                            rec, rng, sample, self.views, self.window, self.max_voxels
                        )
                        break
                    except ImageReadError as e:
                        self._known_bad.add(rec.path)
                        bad.append((e.path, e.reason))
                else:
                    raise DataError(
                        f"{self.retries + 1} files in a row failed to load for one {MODS[m]} sample; "
                        f"first bad: {bad[:5]}"
                    )
        batch, need = packing.pack_groups(views, self.groups, self.seq_len, self.slots, self.dtype)
        info = dict(
            rows_needed=need,
            real_tokens=np.int64(sum(v.num_tokens for v in views)),
            step=np.int64(step),
            tried=np.int64(tried),
            build_s=time.perf_counter() - t0,
            bad_paths=json.dumps(bad),
        )  # a string: cheap to ship between processes
        return batch, info


# ---------------------------------------------------------------- the iterator with bad-file accounting


def _single_process(local: np.ndarray) -> np.ndarray:
    return local[None]


class _TrainIterator(grain.DatasetIterator):
    """Agrees on the bucket, counts bad files and owns the position.

    Each batch arrives packed into as few rows as it needs. ``gather`` (``[k]`` per process ->
    ``[P, k]`` on every process: one small collective, injected by the training code so that
    this module stays JAX-free) shares every process's rows needed and bad-file counts; each
    process then pads to the smallest bucket that holds the largest need, so all processes feed
    the same shape, and the bad-file fraction is checked on global counts.

    The state ``{"step", "bad_files", "tried"}`` (JSON) is global: the same on every process and
    free of the topology, so it restores into a fresh iterator, a new process, another
    ``worker_count`` or another process count alike (a batch is a pure function of its step).
    The pipeline starts lazily, on the first ``next``.
    """

    def __init__(
        self,
        factory,
        *,
        rows: tuple[tuple[int, ...], ...],
        seq_len: int,
        max_bad_fraction: float,
        min_files: int,
        samples_per_batch: int,
        gather=None,
        cached: bool = True,
        workers: int = 0,
    ):
        super().__init__()
        self._cached, self._workers = cached, workers
        self._build_s: list[float] = []
        self._factory = factory  # start step -> DatasetIterator over (batch, info)
        self._it = None
        self._rows, self._seq_len = rows, seq_len
        self._gather = gather or _single_process
        self._step = 0
        self._max_bad = float(max_bad_fraction)
        self._min_files = int(min_files)
        self._samples = samples_per_batch
        self._bad = 0
        self._tried = 0
        self._first_bad: list[tuple[str, str]] = []  # this process's, for the error message
        self._logged: set[str] = set()

    def __next__(self):
        if self._it is None:
            self._it = self._factory(self._step)
        batch, info = next(self._it)
        if int(info["step"]) != self._step:  # the pipeline is ordered; this never fires
            raise RuntimeError(
                f"data pipeline out of order: got step {int(info['step'])}, expected {self._step}"
            )
        self._step += 1
        self._note_build_time(float(info["build_s"]))
        bad = json.loads(info["bad_paths"])
        for path, reason in bad:
            if path not in self._logged:
                self._logged.add(path)
                log.warning("skipping bad file %s: %s", path, reason)
            if len(self._first_bad) < 10:
                self._first_bad.append((path, reason))
        ng = len(self._rows[0])
        local = np.array(
            [*info["rows_needed"], info["real_tokens"], len(bad), info["tried"]], np.int64
        )
        t0 = time.perf_counter()
        table = np.asarray(self._gather(local), np.int64).reshape(-1, local.size)
        agree_s = time.perf_counter() - t0
        need = table[:, :ng].max(0)
        real, n_bad, tried = table[:, ng:].sum(0)
        # the same on every process: the cheapest step shape holding every group's largest need
        rows = packing.bucket_for(tuple(int(n) for n in need), self._rows)
        batch = tuple(packing.pad_rows(b, r) for b, r in zip(batch, rows))
        self._bad += int(n_bad)
        self._tried += int(tried)
        if self._tried >= self._min_files and self._bad > self._max_bad * self._tried:
            listing = "\n  ".join(f"{p}: {r}" for p, r in self._first_bad) or "(on other hosts)"
            raise DataError(
                f"too many bad files: {self._bad} of {self._tried} tried "
                f"({self._bad / self._tried:.1%} > data.max_bad_fraction="
                f"{self._max_bad:g}). First bad files on this host:\n  {listing}"
            )
        capacity = sum(rows) * self._seq_len * len(table)
        stats = dict(
            packing_efficiency=np.float32(real / capacity),
            real_tokens=np.int64(real),
            capacity_tokens=np.int64(capacity),
            rows=np.int64(sum(rows) * len(table)),
            wire_bytes=np.int64(nbytes(batch) * len(table)),
            bad_files=np.int64(self._bad),
            bad_in_batch=np.int64(n_bad),
            samples=np.int64(self._samples),
            step=np.int64(info["step"]),
            agree_s=np.float32(agree_s),
            build_s=np.float32(info["build_s"]),
        )
        return batch, stats

    def _note_build_time(self, seconds: float) -> None:
        """Once, after a few batches: what one batch costs to build on one worker, and, when
        reading original files, that a preprocessed cache is the faster path."""
        if len(self._build_s) >= 8:
            return
        self._build_s.append(seconds)
        if len(self._build_s) < 8:
            return
        per_batch = float(np.median(self._build_s[2:]))  # the first ones warm caches up
        per_sample = per_batch / max(self._samples, 1)
        log.info(
            "building one batch takes %.2f s on one worker (%.1f ms per sample); %d worker "
            "process(es)",
            per_batch,
            1e3 * per_sample,
            self._workers,
        )
        if not self._cached:
            log.warning(
                "training from original files: %.1f ms per sample, decoding and resizing "
                "included; `mmv-cache --manifest M --out DIR` decodes and resizes once, "
                "then train with --config.data.cache_dir=DIR",
                1e3 * per_sample,
            )

    def get_state(self) -> dict:
        return {"step": self._step, "bad_files": self._bad, "tried": self._tried}

    def set_state(self, state: dict) -> None:
        self.close()
        self._step = int(state["step"])
        self._bad = int(state["bad_files"])
        self._tried = int(state["tried"])

    def close(self) -> None:
        """Stops the worker processes (if any); the iterator may continue afterwards."""
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()


class _TrainDataset(grain.IterDataset):
    def __init__(self, factory, **kwargs):
        super().__init__()
        self._factory = factory
        self._kwargs = kwargs

    def __iter__(self):
        return _TrainIterator(self._factory, **self._kwargs)


def make_train_dataset(
    cfg, *, seed: int, process_index: int = 0, process_count: int = 1, gather=None
) -> grain.IterDataset:
    """The Grain ``IterDataset`` behind :func:`make_train_iterator`."""
    seed = int(cfg.shuffle_seed) if int(cfg.shuffle_seed) >= 0 else int(seed)
    src = _TrainSource(cfg, seed, process_index, process_count)
    read = grain.ReadOptions(
        num_threads=int(cfg.read_threads), prefetch_buffer_size=max(1, int(cfg.prefetch))
    )

    def factory(start: int):
        ds = grain.MapDataset.source(src)
        if start:
            ds = ds[start:]
        return iter(mp_prefetch(ds.to_iter_dataset(read), cfg))

    return _TrainDataset(
        factory,
        rows=src.rows,
        seq_len=src.seq_len,
        gather=gather,
        cached=bool(cfg.cache_dir) or all(r.preprocessed for rs in src.records for r in rs),
        workers=workers(cfg),
        max_bad_fraction=float(cfg.max_bad_fraction),
        min_files=int(cfg.get("min_files_for_bad_fraction", 0)),
        samples_per_batch=sum(src.local),
    )


def make_train_iterator(
    cfg, *, seed: int, process_index: int = 0, process_count: int = 1, gather=None
):
    """A checkpointable Grain ``DatasetIterator`` over ``(PackedBatch, stats)`` (module docstring).

    With ``cfg.worker_count > 0`` the batches are built in Grain worker processes
    (``mp_prefetch``); call ``absl.flags`` parsing (or ``app.run``) in the entry point first, and
    ``iterator.close()`` when done.
    """
    return iter(
        make_train_dataset(
            cfg, seed=seed, process_index=process_index, process_count=process_count, gather=gather
        )
    )
