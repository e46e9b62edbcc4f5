"""Attention-kernel block skipping on realistic packed layouts (no timing: counts only).

``python tools/bench.py kernels [--seq-lens 4096 8192 16384] [--batches 4] [--seed 0]``

Generates batches of the paper's mix — 192 2D : 64 3D samples, each with the views the data
pipeline draws (its own sampler, ``data/views.py``, on the nominal image shapes of
``data/config.py``) — packs the views first-fit-decreasing (``data/packing.py``) into rows of each
bucket length, and reports per bucket: rows, packing efficiency, the fraction of (q-block,
k-block) pairs each kernel skips (Pallas TPU 128x128, Triton forward 128x64 and backward 64x64),
and the useful fraction of dense S^2 work (sum of squared segment lengths / S^2). A human table
goes to stderr; `run` returns the numbers (bench.py prints them as JSON).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from benchlib import sample_view_grids, skipped_fraction, useful_fraction

from mmv_jax.data.packing import ffd_rows
from mmv_jax.kernels import pallas_tpu, triton_gpu

N_2D, N_3D = 192, 64  # samples of each modality per batch
KERNEL_BLOCKS = {
    "pallas_tpu": (pallas_tpu.BLOCK_Q, pallas_tpu.BLOCK_K),
    "triton_fwd": (triton_gpu.BLOCK_M, triton_gpu.BLOCK_N),
    "triton_bwd": (triton_gpu.BLOCK_M_BWD, triton_gpu.BLOCK_N_BWD),
}


def batch_view_sizes(rng) -> list[int]:
    """Token counts of all views of one batch (N_2D 2D + N_3D 3D samples)."""
    return [
        math.prod(g)
        for modality, n in ((0, N_2D), (1, N_3D))
        for _ in range(n)
        for g in sample_view_grids(rng, modality)
    ]


def ffd_pack(sizes, seq_len: int) -> list[list[int]]:
    """The packer's first-fit decreasing, no slot limit: item sizes of each row."""
    return [[sizes[i] for i in row] for row in ffd_rows(sizes, seq_len, slots=len(sizes))]


def segment_rows(rows, seq_len: int) -> np.ndarray:
    """[R, S] int32 segment ids: contiguous runs 1..n per row, padding (0) at the end."""
    out = np.zeros((len(rows), seq_len), np.int32)
    for r, items in enumerate(rows):
        pos = 0
        for sid, n in enumerate(items, start=1):
            out[r, pos : pos + n] = sid
            pos += n
    return out


def packed_layouts(seq_len: int, *, batches: int = 1, seed: int = 0) -> np.ndarray:
    """Segment ids of `batches` generated batches packed into rows of `seq_len` tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batches):
        rows.append(segment_rows(ffd_pack(batch_view_sizes(rng), seq_len), seq_len))
    return np.concatenate(rows)


def synthetic_row(seq_len: int, n_segments: int, *, fill: float = 1.0) -> np.ndarray:
    """One row of `n_segments` equal contiguous segments covering `fill` of the row."""
    used = int(seq_len * fill)
    bounds = np.linspace(0, used, n_segments + 1).astype(int)
    row = np.zeros(seq_len, np.int32)
    for i in range(n_segments):
        row[bounds[i] : bounds[i + 1]] = i + 1
    return row


def layout_stats(seg: np.ndarray) -> dict:
    stats = {
        "rows": int(seg.shape[0]),
        "packing_efficiency": float((seg != 0).mean()),
        "segments_per_row": float(np.mean([len(np.unique(r[r != 0])) for r in seg])),
        "useful_fraction": useful_fraction(seg),
    }
    for name, (bq, bk) in KERNEL_BLOCKS.items():
        stats[f"skipped_{name}"] = skipped_fraction(seg, bq, bk)
    return stats


def run(argv) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--batches", type=int, default=2, help="generated batches per bucket")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = {}
    hdr = f"{'S':>6} {'rows':>5} {'pack':>6} {'segs/row':>8} {'useful':>7} " + " ".join(
        f"{'skip ' + k:>17}" for k in KERNEL_BLOCKS
    )
    print(hdr, file=sys.stderr)
    for s in args.seq_lens:
        st = layout_stats(packed_layouts(s, batches=args.batches, seed=args.seed))
        out[str(s)] = st
        print(
            f"{s:>6} {st['rows']:>5} {st['packing_efficiency']:>6.3f} {st['segments_per_row']:>8.1f} "
            f"{st['useful_fraction']:>7.4f} "
            + " ".join(f"{st['skipped_' + k]:>17.4f}" for k in KERNEL_BLOCKS),
            file=sys.stderr,
        )
    return {"suite": "kernels", "buckets": out}


if __name__ == "__main__":
    import json

    print(json.dumps(run(sys.argv[1:]), indent=1))
