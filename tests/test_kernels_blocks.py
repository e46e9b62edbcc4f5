"""Block-skipping bookkeeping: numpy helper vs brute force, and the JAX side agrees with it."""
import numpy as np
import pytest

from mmv_jax.kernels import blocks


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
        row[pos:pos + n] = sid
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
        qs = row[i * bq:(i + 1) * bq]
        qs = qs[qs != 0]
        for j in range(nk):
            ks = row[j * bk:(j + 1) * bk]
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
    mask = blocks.block_overlap(row, bq, bk)
    want, share = _brute(row, bq, bk)
    np.testing.assert_array_equal(mask, want)
    # conservative always, exact for monotone ids (what the packer emits)
    assert not (share & ~mask).any()
    if monotone:
        np.testing.assert_array_equal(mask, share)
    computed, total = blocks.block_counts(row, bq, bk)
    assert computed == want.sum() and total == want.size
    assert blocks.skipped_fraction(row, bq, bk) == pytest.approx(1 - want.sum() / want.size)


def test_special_layouts():
    one = np.ones(32, np.int32)
    assert blocks.skipped_fraction(one, 8, 8) == 0.0
    pad = np.zeros(32, np.int32)
    assert blocks.skipped_fraction(pad, 8, 8) == 1.0
    diag = np.repeat(np.arange(1, 5, dtype=np.int32), 8)     # 4 segments, one per block
    np.testing.assert_array_equal(blocks.block_overlap(diag, 8, 8), np.eye(4, dtype=bool))
    start, end = blocks.kv_block_spans(diag, 8, 8)
    np.testing.assert_array_equal(start, np.arange(4))
    np.testing.assert_array_equal(end, np.arange(4))
    assert blocks.useful_flops_fraction(diag) == pytest.approx(4 * 64 / 32 ** 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        blocks.block_overlap(np.ones(30, np.int32), 8, 8)


def test_jax_block_ranges_agree_with_numpy():
    jnp = pytest.importorskip("jax.numpy")
    from mmv_jax.kernels import pallas_tpu
    rng = np.random.default_rng(7)
    rows = np.stack([_packed_row(rng, 512, max_len=m, pad_prob=0.15, monotone=m % 2 == 0)
                     for m in (1, 40, 130, 300)])
    rows[3, 200:] = 0                                      # trailing padding, all-padding blocks
    for blk in (128, 256):
        lo, hi = pallas_tpu.block_segment_ranges(jnp.asarray(rows), blk)
        for r, row in enumerate(rows):
            nlo, nhi = blocks.block_ranges(row, blk)
            np.testing.assert_array_equal(np.asarray(lo[r]), nlo)
            np.testing.assert_array_equal(np.asarray(hi[r]), nhi)
    mask = np.asarray(pallas_tpu.block_overlap_mask(jnp.asarray(rows), 128, 256))
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(mask[r], blocks.block_overlap(row, 128, 256))


def test_bench_kernels_layouts():
    """tools/bench_kernels.py: the paper's view mix packs into monotone contiguous rows."""
    import importlib.util as iu
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "bench_kernels.py")
    spec = iu.spec_from_file_location("bench_kernels", path)
    bk = iu.module_from_spec(spec)
    spec.loader.exec_module(bk)
    rng = np.random.default_rng(0)
    sizes = bk.batch_view_sizes(rng)
    assert len(sizes) == (bk.N_2D + bk.N_3D) * 10
    assert 1 <= min(sizes) and max(sizes) <= 512
    seg = bk.packed_layouts(4096, batches=1, seed=0)
    assert int((seg != 0).sum()) == sum(bk.batch_view_sizes(np.random.default_rng(0)))
    for row in seg:
        ids = row[row != 0]
        assert (np.diff(ids) >= 0).all()                       # increasing along the row
        assert len(np.unique(ids)) == int((np.diff(row) != 0).sum() + (row[0] != 0)
                                          - (row[-1] == 0))    # one contiguous run per id
    out = bk.run(["--seq-lens", "4096", "--batches", "1"])
    st = out["buckets"]["4096"]
    assert 0.8 < st["skipped_pallas_tpu"] < 1.0 and st["useful_fraction"] < 0.1
    assert st["skipped_pallas_tpu"] == pytest.approx(blocks.skipped_fraction(seg, 128, 128))
