"""Attention-kernel block skipping on realistic packed layouts (no timing: counts only).

``python tools/bench.py kernels [--seq-lens 4096 8192 16384] [--batches 4] [--seed 0]``

Generates batches with the paper's view mix — per sample 2 global views (area scale 0.3-1.0)
and 8 local views (0.05-0.3) of a 224-long-side 2D image in 14-px patches (a full view is
16x16 = 256 tokens) or a 112-long-side 3D volume (8x8x8 = 512 tokens), 192 2D : 64 3D samples
a batch — packs the views first-fit-decreasing into rows of each bucket length, and reports per
bucket: rows, packing efficiency, the fraction of (q-block, k-block) pairs each kernel skips
(Pallas TPU 128x128, Triton forward 128x64 and backward 64x64), and the useful fraction of
dense S^2 work (sum of squared segment lengths / S^2). A human table goes to stderr; `run`
returns the numbers (bench.py prints them as JSON).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from benchlib import skipped_fraction, useful_fraction

PATCH_PX = 14
SIDE_2D_PX = 224          # 16 x 16 patches
SIDE_3D_PX = 112          # 8 x 8 x 8 patches
N_2D, N_3D = 192, 64      # samples of each modality per batch
GLOBAL_SCALE = (0.3, 1.0)
LOCAL_SCALE = (0.05, 0.3)
N_GLOBAL, N_LOCAL = 2, 8
KERNEL_BLOCKS = {"pallas_tpu": (128, 128), "triton_fwd": (128, 64), "triton_bwd": (64, 64)}


def view_tokens(rng, is_3d: bool, scale: float) -> int:
    """Token count of one crop covering `scale` of the image area (volume for 3D), random aspect."""
    if is_3d:
        g = SIDE_3D_PX // PATCH_PX
        r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=2))
        side = scale ** (1 / 3) * np.array([r[0], 1 / r[0] * r[1], 1 / r[1]]) ** (1 / 3)
        dims = np.clip(np.round(side * g), 1, g)
    else:
        g = SIDE_2D_PX // PATCH_PX
        r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        side = np.sqrt(scale) * np.array([np.sqrt(r), 1 / np.sqrt(r)])
        dims = np.clip(np.round(side * g), 1, g)
    return int(np.prod(dims))


def batch_view_sizes(rng) -> list[int]:
    """Token counts of all views of one batch (192 2D + 64 3D samples, 10 views each)."""
    sizes = []
    for is_3d in [False] * N_2D + [True] * N_3D:
        for lo_hi, n in ((GLOBAL_SCALE, N_GLOBAL), (LOCAL_SCALE, N_LOCAL)):
            sizes += [view_tokens(rng, is_3d, rng.uniform(*lo_hi)) for _ in range(n)]
    return sizes


def ffd_pack(sizes, seq_len: int) -> list[list[int]]:
    """First-fit decreasing: item sizes of each row, in placement order."""
    free: list[int] = []
    rows: list[list[int]] = []
    for s in sorted(sizes, reverse=True):
        if s > seq_len:
            raise ValueError(f"a view of {s} tokens exceeds the row length {seq_len}")
        for r, f in enumerate(free):
            if f >= s:
                rows[r].append(s)
                free[r] -= s
                break
        else:
            rows.append([s])
            free.append(seq_len - s)
    return rows


def segment_rows(rows, seq_len: int) -> np.ndarray:
    """[R, S] int32 segment ids: contiguous runs 1..n per row, padding (0) at the end."""
    out = np.zeros((len(rows), seq_len), np.int32)
    for r, items in enumerate(rows):
        pos = 0
        for sid, n in enumerate(items, start=1):
            out[r, pos:pos + n] = sid
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
        row[bounds[i]:bounds[i + 1]] = i + 1
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
    hdr = (f"{'S':>6} {'rows':>5} {'pack':>6} {'segs/row':>8} {'useful':>7} "
           + " ".join(f"{'skip ' + k:>17}" for k in KERNEL_BLOCKS))
    print(hdr, file=sys.stderr)
    for s in args.seq_lens:
        st = layout_stats(packed_layouts(s, batches=args.batches, seed=args.seed))
        out[str(s)] = st
        print(f"{s:>6} {st['rows']:>5} {st['packing_efficiency']:>6.3f} {st['segments_per_row']:>8.1f} "
              f"{st['useful_fraction']:>7.4f} "
              + " ".join(f"{st['skipped_' + k]:>17.4f}" for k in KERNEL_BLOCKS), file=sys.stderr)
    return {"suite": "kernels", "buckets": out}


if __name__ == "__main__":
    import json
    print(json.dumps(run(sys.argv[1:]), indent=1))
