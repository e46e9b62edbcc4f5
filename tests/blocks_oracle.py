"""Plain-numpy block bookkeeping, one row at a time: the oracle the kernels' device-side
metadata (``mmv_jax.kernels.blocks``) is tested against. Definitions in that module."""

import numpy as np

# An empty (all-padding) block's range: its min is above and its max below every id.
EMPTY_MIN = np.iinfo(np.int32).max
EMPTY_MAX = -1


def block_ranges(row, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (min, max) non-zero segment id of a row; empty blocks get (EMPTY_MIN, EMPTY_MAX)."""
    row = np.asarray(row, np.int64)
    assert row.ndim == 1 and row.shape[0] % block == 0, (row.shape, block)
    blocks = row.reshape(-1, block)
    valid = blocks != 0
    return np.where(valid, blocks, EMPTY_MIN).min(axis=1), np.where(valid, blocks, EMPTY_MAX).max(
        axis=1
    )


def block_overlap(row, block_q: int, block_k: int) -> np.ndarray:
    """Bool [nq, nk]: True where the (q-block, k-block) segment ranges overlap."""
    qlo, qhi = block_ranges(row, block_q)
    klo, khi = block_ranges(row, block_k)
    return (qlo[:, None] <= khi[None, :]) & (klo[None, :] <= qhi[:, None])


def spans(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last True column of each row of a bool [n, m]; (0, -1) where none."""
    has = mask.any(axis=1)
    first = np.where(has, mask.argmax(axis=1), 0)
    last = np.where(has, mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1), -1)
    return first, last


def block_metadata(seg, block_q: int, block_k: int) -> list[np.ndarray]:
    """``kernels.blocks.block_metadata`` computed row by row: (qlo, qhi, klo, khi, kstart, kend,
    qstart, qend), each flattened over the rows, int32."""
    parts = [[] for _ in range(8)]
    for row in np.asarray(seg):
        mask = block_overlap(row, block_q, block_k)
        for out, x in zip(
            parts,
            (
                *block_ranges(row, block_q),
                *block_ranges(row, block_k),
                *spans(mask),
                *spans(mask.T),
            ),
        ):
            out.append(x)
    return [np.concatenate(p).astype(np.int32) for p in parts]
