import numpy as np
import pytest

from mmv_jax.batch import PATCH, View, packing_efficiency
from mmv_jax.data.packing import ffd_rows as first_fit_rows, pack_into as pack_views, pack_rows
from mmv_jax.data.patches import make_view, patchify

P = PATCH


def test_patchify_3d_roundtrip_order():
    vol = np.random.default_rng(0).standard_normal((1, 28, 42, 14)).astype(np.float32)
    patches, grid = patchify(vol)
    assert grid == (2, 3, 1) and patches.shape == (6, P**3)
    # token (z=1, y=2, x=0) is the cube vol[:, 14:28, 28:42, 0:14]
    np.testing.assert_array_equal(patches[1 * 3 + 2], vol[0, 14:28, 28:42, 0:14].reshape(-1))


def test_patchify_2d_pseudo_volume_and_shortcut():
    img = np.random.default_rng(1).standard_normal((1, 1, 28, 56)).astype(np.float32)
    full, grid = patchify(img)
    short, grid2 = patchify(img, depth_slice_only=True)
    assert grid == grid2 == (1, 2, 4)
    cubes = full.reshape(-1, P, P, P)
    np.testing.assert_array_equal(cubes[:, 0].reshape(8, -1), short)
    assert not cubes[:, 1:].any()
    np.testing.assert_array_equal(short[5], img[0, 0, 14:28, 14:28].reshape(-1))


def test_crop_and_pad_modes():
    vol = np.ones((1, 30, 15, 13), np.float32)
    p, grid = patchify(vol)  # crop 30->28, 15->14; 13 < 14 pads
    assert grid == (2, 1, 1)
    p2, grid2 = patchify(vol, mode="pad")
    assert grid2 == (3, 2, 1)
    with pytest.raises(ValueError, match="mode"):
        patchify(np.ones((1, 1, 15, 15)), mode="nope")
    with pytest.raises(ValueError, match=r"\[C, Z, H, W\]"):
        patchify(np.ones((15, 15)))


def test_pack_views_accounts_for_every_token():
    rng = np.random.default_rng(2)
    views = []
    for s in range(5):
        for i in range(3):
            shape = (
                (1, 14 * rng.integers(1, 5), 14 * rng.integers(1, 5))
                if s % 2
                else (28, 28, 14 * rng.integers(1, 3))
            )
            views.append(
                make_view(
                    rng.standard_normal(shape).astype(np.float32),
                    sample=s,
                    is_global=i < 2,
                    index=i,
                )
            )
    total = sum(v.num_tokens for v in views)
    b = pack_views(views, rows=4, seq_len=64, slots=8)
    assert (b.segment_ids > 0).sum() == total
    assert packing_efficiency(b) == pytest.approx(total / (4 * 64))
    for r in range(4):
        for j in range(8):
            n = (b.segment_ids[r] == j + 1).sum()
            if b.view_sample[r, j] < 0:
                assert n == 0
                continue
            match = [
                v
                for v in views
                if v.sample == b.view_sample[r, j] and v.index == b.view_index[r, j]
            ]
            assert len(match) == 1 and match[0].num_tokens == n
            np.testing.assert_array_equal(b.patches[r][b.segment_ids[r] == j + 1], match[0].patches)
            idx = np.flatnonzero(b.segment_ids[r] == j + 1)
            assert np.all(np.diff(idx) == 1)  # contiguous


def test_pack_errors():
    v = View(np.zeros((70, P**3), np.float32), np.zeros((70, 3), np.float32), 0, True, 0, 0)
    with pytest.raises(ValueError, match="exceeds the row length"):
        first_fit_rows([70], 64, 4)
    with pytest.raises(ValueError, match="rows"):
        pack_views([v, v], rows=1, seq_len=100, slots=4)
    with pytest.raises(ValueError, match="slots"):
        pack_rows([[v, v]], seq_len=200, slots=1)
