"""The evaluation iterator (host side, numpy + Grain): one deterministic whole-image view per
image, every batch one shape (:func:`eval_batch_shape`). Re-exported by
:mod:`mmv_jax.data.pipeline`, whose docstring describes it."""

from __future__ import annotations

import logging
import math
import os

import grain

from mmv_jax.data import packing
from mmv_jax.data.config import max_image_voxels, max_view_tokens, mp_prefetch
from mmv_jax.data.manifest import load_manifest
from mmv_jax.data.readers import ImageReadError, file_errors
from mmv_jax.data.transforms import load_preprocessed
from mmv_jax.data.views import whole_view
from mmv_jax.errors import ConfigError

log = logging.getLogger(__name__)


class _EvalSource:
    def __init__(self, records, cfg, batch_size, seq_len, slots, patch_dim, rows, num_batches):
        self.records, self.bs, self.num_batches = records, int(batch_size), int(num_batches)
        self.views = dict(
            long_side_2d=int(cfg.views.long_side_2d), long_side_3d=int(cfg.views.long_side_3d)
        )
        self.window = tuple(cfg.ct_window)
        self.max_voxels = max_image_voxels(cfg)
        self.seq_len, self.slots, self.patch_dim, self.rows = seq_len, slots, patch_dim, rows

    def __len__(self):
        return self.num_batches

    def __getitem__(self, b):
        views, ids = [], []
        for rec in self.records[b * self.bs : (b + 1) * self.bs]:
            try:
                image = load_preprocessed(
                    rec, **self.views, ct_window=self.window, max_voxels=self.max_voxels
                )
                with file_errors(rec.path, "view"):
                    view = whole_view(image, sample=len(ids), modality=int(rec.modality == "ct"))
            except ImageReadError as e:
                log.warning("skipping bad file %s: %s", e.path, e.reason)
                continue
            views.append(view)
            ids.append(rec.id)
        return packing.pack_into(views, self.rows, self.seq_len, self.slots, self.patch_dim), ids


def eval_batch_shape(cfg, batch_size: int, has_3d: bool) -> tuple[int, int, int, int]:
    """``(rows, seq_len, slots, patch_dim)`` of every eval batch: rows for the worst case (each
    whole image at its largest token count), so one shape per eval set."""
    s, slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    t2, t3 = max_view_tokens(cfg)
    per_row = max(1, min(slots, s // (t3 if has_3d else t2)))
    rows = math.ceil(batch_size / per_row)
    m = int(cfg.rows_multiple_of)
    return int(math.ceil(rows / m) * m), s, slots, packing.patch_dim_for(has_3d)


def make_eval_iterator(
    cfg,
    manifest_path_or_records,
    *,
    split: str | None = None,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Iterator of ``(batch, ids)`` with one deterministic whole-image view per image.

    ``manifest_path_or_records``: a manifest path or a list of :class:`Record`. ``split``
    filters records (``None``: all). Process ``p`` takes records ``p::process_count``, and every
    process yields the same number of batches (trailing ones may be empty), so a sharded forward
    pass runs in lockstep. Unreadable files are skipped (logged); ``ids`` lists the images in the
    batch, and ``view_sample`` is the position in ``ids``. Every batch has the shape
    :func:`eval_batch_shape` (the last ones may hold fewer images).
    """
    if isinstance(manifest_path_or_records, (str, os.PathLike)):
        records = load_manifest(manifest_path_or_records, splits=split)
    else:
        records = [r for r in manifest_path_or_records if split is None or r.split == split]
    has_3d = any(r.modality == "ct" for r in records)  # all processes: one shape everywhere
    num_batches = math.ceil(math.ceil(len(records) / process_count) / int(batch_size))
    records = records[process_index::process_count]
    rows, s, slots, pd = eval_batch_shape(cfg, batch_size, has_3d)
    t2, t3 = max_view_tokens(cfg)
    if (t3 if has_3d else t2) > s:
        raise ConfigError(
            f"config data.buckets.seq_len={s} is shorter than a whole image "
            f"({t3 if has_3d else t2} tokens)"
        )
    src = _EvalSource(records, cfg, batch_size, s, slots, pd, rows, num_batches)
    ds = grain.MapDataset.source(src).to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(cfg.read_threads), prefetch_buffer_size=max(1, int(cfg.prefetch))
        )
    )
    return iter(mp_prefetch(ds, cfg))
