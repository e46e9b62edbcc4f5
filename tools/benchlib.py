"""Shared pieces of the benchmarks: a packed row of the paper's view mix, timing, and the
attention work statistics of packed rows (the FLOP count and the matmul peak live in
mmv_jax.train.metrics)."""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from mmv_jax.batch import PATCH, View, grid_coords
from mmv_jax.data.packing import ffd_rows, pack_rows
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


def paper_view_sizes(rng, modality: int) -> list[tuple[int, int, int]]:
    """Grids of one sample's 2 global + 8 local views (METHOD.md scales, long side 224 / 112)."""
    if modality == 0:
        base = np.array([1, 224, 224 * rng.uniform(0.75, 1.0)])
    else:
        base = np.array([112 * rng.uniform(0.7, 1.0), 112, 112 * rng.uniform(0.85, 1.0)])
    out = []
    for scale_lo, scale_hi, n in ((0.3, 1.0, 2), (0.05, 0.3, 8)):
        for _ in range(n):
            s = rng.uniform(scale_lo, scale_hi)
            side = base * (s ** (1 / (2 if modality == 0 else 3)))
            grid = np.maximum(1, np.floor(side / PATCH)).astype(int)
            if modality == 0:
                grid[0] = 1
            out.append(tuple(int(g) for g in grid))
    return out


def paper_mix_row(seq_len: int, seed: int = 0, ratio_3d: float = 0.25, slots: int = 96):
    """One packed row of ``seq_len`` tokens holding whole samples of the paper's mix."""
    rng = np.random.default_rng(seed)
    views: list[View] = []
    sample = 0
    while True:
        modality = int(rng.uniform() < ratio_3d)
        grids = paper_view_sizes(rng, modality)
        new = []
        for i, g in enumerate(grids):
            n = int(np.prod(g))
            new.append(View(rng.uniform(-1, 1, (n, PATCH ** 3)).astype(np.float32),
                            grid_coords(g), sample, i < 2, modality, i))
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
