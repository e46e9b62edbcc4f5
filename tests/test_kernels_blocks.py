"""Block-skipping bookkeeping: the kernels' device-side metadata and the numpy oracle agree with
brute force and with each other; the benchmark statistics built on them."""

import os
import sys

import blocks_oracle
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.kernels import blocks

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
import bench_kernels  # noqa: E402  (tools/ is not a package)
import benchlib  # noqa: E402


def _packed_row(rng, s, *, max_len, pad_prob=0.0, monotone=True):
    """Contiguous segments of random lengths; optional padding runs anywhere."""
    row = np.zeros(s, np.int32)
    pos, sid = 0, 0
    while pos < s:
        n = int(rng.integers(1, max_len + 1))
        if rng.random() < pad_prob:
            pos += n
            continue
        sid += 1
        row[pos : pos + n] = sid
        pos += n
    if not monotone:
        ids = np.unique(row[row != 0])
        perm = dict(zip(ids, rng.permutation(ids)))
        row = np.array([perm.get(x, 0) for x in row], np.int32)
    return row


def _brute(row, bq, bk):
    nq, nk = len(row) // bq, len(row) // bk
    mask = np.zeros((nq, nk), bool)
    share = np.zeros((nq, nk), bool)
    for i in range(nq):
        qs = row[i * bq : (i + 1) * bq]
        qs = qs[qs != 0]
        for j in range(nk):
            ks = row[j * bk : (j + 1) * bk]
            ks = ks[ks != 0]
            if len(qs) and len(ks):
                mask[i, j] = qs.min() <= ks.max() and ks.min() <= qs.max()
                share[i, j] = bool(np.intersect1d(qs, ks).size)
    return mask, share


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bq,bk", [(4, 4), (4, 8), (8, 4)])
def test_block_overlap_matches_brute_force(seed, bq, bk):
    rng = np.random.default_rng(seed)
    monotone = seed % 2 == 0
    row = _packed_row(rng, 64, max_len=int(rng.integers(1, 20)), pad_prob=0.2, monotone=monotone)
    want, share = _brute(row, bq, bk)
    np.testing.assert_array_equal(blocks_oracle.block_overlap(row, bq, bk), want)
    np.testing.assert_array_equal(
        np.asarray(blocks.block_overlap_mask(jnp.asarray(row[None]), bq, bk))[0], want
    )
    # conservative always, exact for monotone ids (what the packer emits)
    assert not (share & ~want).any()
    if monotone:
        np.testing.assert_array_equal(want, share)


def test_jax_block_metadata_agrees_with_numpy():
    rng = np.random.default_rng(7)
    rows = np.stack(
        [
            _packed_row(rng, 512, max_len=m, pad_prob=0.15, monotone=m % 2 == 0)
            for m in (1, 40, 130, 300)
        ]
    )
    rows[3, 200:] = 0  # trailing padding, all-padding blocks
    for bq, bk in ((128, 128), (128, 64), (64, 256)):
        for got, want in zip(
            blocks.block_metadata(jnp.asarray(rows), bq, bk),
            blocks_oracle.block_metadata(rows, bq, bk),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(got), want)


def test_statistics_of_special_layouts():
    assert benchlib.skipped_fraction(np.ones(32, np.int32), 8, 8) == 0.0
    assert benchlib.skipped_fraction(np.zeros(32, np.int32), 8, 8) == 1.0
    diag = np.repeat(np.arange(1, 5, dtype=np.int32), 8)  # 4 segments, one per block
    assert benchlib.block_counts(np.stack([diag, diag]), 8, 8) == (8, 32)
    assert benchlib.skipped_fraction(diag, 8, 16) == pytest.approx(0.5)
    assert benchlib.useful_fraction(diag) == pytest.approx(4 * 64 / 32**2)
    assert benchlib.useful_fraction(np.stack([diag, np.ones(32, np.int32)])) == pytest.approx(0.625)


def test_bench_kernels_layouts():
    """tools/bench_kernels.py: the paper's view mix packs into monotone contiguous rows."""
    bk = bench_kernels
    rng = np.random.default_rng(0)
    sizes = bk.batch_view_sizes(rng)
    assert len(sizes) == (bk.N_2D + bk.N_3D) * 10
    assert 1 <= min(sizes) and max(sizes) <= 512
    seg = bk.packed_layouts(4096, batches=1, seed=0)
    assert int((seg != 0).sum()) == sum(bk.batch_view_sizes(np.random.default_rng(0)))
    for row in seg:
        ids = row[row != 0]
        assert (np.diff(ids) >= 0).all()  # increasing along the row
        assert len(np.unique(ids)) == int(
            (np.diff(row) != 0).sum() + (row[0] != 0) - (row[-1] == 0)
        )  # one contiguous run per id
    out = bk.run(["--seq-lens", "4096", "--batches", "1"])
    st = out["buckets"]["4096"]
    assert 0.8 < st["skipped_pallas_tpu"] < 1.0 and st["useful_fraction"] < 0.1
    mask = np.stack([blocks_oracle.block_overlap(row, 128, 128) for row in seg])
    assert st["skipped_pallas_tpu"] == pytest.approx(1 - mask.mean())
