"""Shared pieces of the benchmarks: views drawn as the data pipeline draws them, a packed row of
them, timing, and the attention work statistics of packed rows (the FLOP count and the matmul
peak live in mmv_jax.train.metrics)."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from mmv_jax.batch import PATCH, View, grid_coords
from mmv_jax.data import pipeline
from mmv_jax.data.packing import ffd_rows, pack_rows
from mmv_jax.data.views import view_grids
from mmv_jax.kernels.blocks import block_overlap_mask
from mmv_jax.train.metrics import encoder_flops, measure_matmul_peak  # noqa: F401  (re-exported)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_fn(fn, reps: int = 3) -> float:
    """Median seconds over ``reps`` calls after one warm-up call (``fn`` blocks)."""
    fn()
    return float(np.median([_timed(fn) for _ in range(reps)]))


# The paper's data config (METHOD.md: 2 global + 8 local views, long sides 224 / 112) and the
# image shapes the pipeline sizes its buckets for when a manifest has none.
DATA = pipeline.default_config()
SHAPES = (tuple(DATA.buckets.nominal_cxr_shape), tuple(DATA.buckets.nominal_ct_shape))


def sample_view_grids(rng, modality: int) -> list[tuple[int, int, int]]:
    """Patch grids of one sample's views, drawn by the pipeline's own view sampler
    (``data/views.py``) for the nominal image of ``modality`` (0: X-ray, 1: CT)."""
    return view_grids(rng, SHAPES[modality], **pipeline._view_kwargs(DATA))


def paper_mix_row(seq_len: int, seed: int = 0, ratio_3d: float = 0.25, slots: int = 96):
    """One packed row of ``seq_len`` tokens holding whole samples of the paper's mix."""
    rng = np.random.default_rng(seed)
    views: list[View] = []
    sample = 0
    while True:
        modality = int(rng.uniform() < ratio_3d)
        grids = sample_view_grids(rng, modality)
        new = []
        for i, g in enumerate(grids):
            n = int(np.prod(g))
            new.append(
                View(
                    rng.uniform(-1, 1, (n, PATCH**3)).astype(np.float32),
                    grid_coords(g),
                    sample,
                    i < 2,
                    modality,
                    i,
                )
            )
        if sum(v.num_tokens for v in views + new) > seq_len or len(views) + len(new) > slots:
            break
        views += new
        sample += 1
    rows = ffd_rows([v.num_tokens for v in views], seq_len, slots)
    assert len(rows) == 1
    return pack_rows([[views[i] for i in rows[0]]], seq_len, slots), views


def useful_fraction(segment_ids) -> float:
    """The share of dense S x S attention work that is useful: per row, the sum over its segments
    of len^2 / S^2, averaged over the rows of ``segment_ids`` ([S] or [R, S])."""
    rows = np.atleast_2d(np.asarray(segment_ids))
    sq = [(np.unique(r[r != 0], return_counts=True)[1].astype(np.float64) ** 2).sum() for r in rows]
    return float(np.mean(sq)) / rows.shape[1] ** 2


def block_counts(segment_ids, block_q: int, block_k: int) -> tuple[int, int]:
    """(computed, total) (q-block, k-block) pairs over the rows of ``segment_ids`` ([S] or
    [R, S]): the kernels' own block skipping (``kernels.blocks``)."""
    mask = np.asarray(block_overlap_mask(jnp.asarray(np.atleast_2d(segment_ids)), block_q, block_k))
    return int(mask.sum()), mask.size


def skipped_fraction(segment_ids, block_q: int, block_k: int) -> float:
    """The fraction of (q-block, k-block) pairs the kernels skip."""
    computed, total = block_counts(segment_ids, block_q, block_k)
    return 1.0 - computed / total
