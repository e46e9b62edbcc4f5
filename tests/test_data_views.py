"""Transforms, views and tokenisation (tests/test_data_views.py)."""

import numpy as np
import pytest

from mmv_jax.batch import PATCH
from mmv_jax.data.transforms import normalize, resize_long_side, target_shape
from mmv_jax.data.views import crop_shape, sample_views, view_tokens, whole_view

VK = dict(n_global=2, n_local=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))


def test_resize_long_side_2d_and_anisotropic_3d():
    img = np.random.default_rng(0).random((1, 3000, 2500)).astype(np.float32)
    out, sp = resize_long_side(img, (1.0, 0.14, 0.14), 224)
    assert out.shape == (1, 224, 187) and out.dtype == np.float32
    assert sp[1] == pytest.approx(sp[2], rel=0.01)
    vol = np.zeros((300, 512, 512), np.float32)
    # 300 slices of 1.25 mm = 375 mm, 512 x 0.7 mm = 358 mm: z is the long side
    assert target_shape(vol.shape, (1.25, 0.7, 0.7), 112) == (112, 107, 107)
    assert target_shape(vol.shape, (0.5, 0.7, 0.7), 112) == (47, 112, 112)
    small = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    out, _ = resize_long_side(small, (3.0, 1.0, 1.0), 6)  # upsampling works too
    assert out.shape == (6, 4, 6)


def test_resize_preserves_mean_and_constant():
    vol = np.full((60, 200, 180), 7.0, np.float32)
    out, _ = resize_long_side(vol, (2.0, 1.0, 1.0), 112)
    np.testing.assert_allclose(out, 7.0, rtol=1e-5)


def test_normalize():
    ct = np.array([-2000, -1000, 250, 1500, 3000], np.float32)
    np.testing.assert_allclose(normalize(ct, "ct"), [-1, -1, 0, 1, 1], atol=1e-6)
    x = np.array([3.0, 5.0, 7.0], np.float32)
    np.testing.assert_allclose(normalize(x, "cxr"), [-1, 0, 1])
    assert (normalize(np.ones(4, np.float32), "cxr") == 0).all()


@pytest.mark.parametrize("dims", [(224, 224), (224, 186), (112, 112, 112), (98, 112, 112)])
@pytest.mark.parametrize("scale", [(0.3, 1.0), (0.05, 0.3)])
def test_crop_scale_ranges(dims, scale):
    rng = np.random.default_rng(0)
    total = float(np.prod(dims))
    fracs = []
    for _ in range(300):
        size = crop_shape(rng, dims, scale)
        assert all(s % PATCH == 0 and 0 < s <= d for s, d in zip(size, dims))
        fracs.append(np.prod(size) / total)
        # aspect ratio kept up to the patch grid: per-axis fractions within one patch
        f = [s / d for s, d in zip(size, dims)]
        assert max(f) - min(f) <= 2 * PATCH / min(dims) + 1e-9
    fracs = np.array(fracs)
    lo, hi = scale
    assert fracs.min() >= lo - 1e-9 and fracs.max() <= hi + 1e-9
    assert fracs.max() - fracs.min() > 0.3 * (hi - lo)  # covers the range, not a point


@pytest.mark.parametrize("shape", [(1, 224, 186), (98, 112, 112)])
def test_sample_views_counts_and_tokens(shape):
    img = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    views = sample_views(
        img,
        np.random.default_rng(5),
        sample=3,
        modality=int(shape[0] > 1),
        flips=(0.5, 0.5, 0.5),
        **VK,
    )
    assert len(views) == 10
    assert [v.index for v in views] == list(range(10))
    assert [v.is_global for v in views] == [True] * 2 + [False] * 8
    assert all(v.sample == 3 and v.modality == int(shape[0] > 1) for v in views)
    width = PATCH * PATCH if shape[0] == 1 else PATCH**3
    for v in views:
        assert v.patches.shape[1] == width and v.patches.dtype == np.float32
        assert v.coords.shape == (v.num_tokens, 3)
        assert np.abs(v.patches).max() <= 1.0
        if shape[0] == 1:
            assert (v.coords[:, 0] == 0).all()
    # globals hold more tokens than locals on average
    assert np.mean([v.num_tokens for v in views[:2]]) > np.mean([v.num_tokens for v in views[2:]])


@pytest.mark.parametrize("shape", [(1, 224, 186), (98, 112, 112), (40, 120, 100)])
def test_view_tokens_are_the_token_counts_of_sample_views(shape):
    """The geometry-only sampler (it sizes the packing buckets) counts the tokens of the view
    sample_views draws from the same stream: the crop size is the first draw of each view."""
    img = np.zeros(shape, np.float32)
    for seed in range(20):
        for scale in (VK["global_scale"], VK["local_scale"]):
            kw = dict(n_global=1, n_local=0, global_scale=scale)
            want = view_tokens(np.random.default_rng(seed), shape, **kw)
            views = sample_views(
                img,
                np.random.default_rng(seed),
                sample=0,
                modality=int(shape[0] > 1),
                flips=(0.0, 0.0, 0.0),
                **kw,
            )
            assert want == [views[0].num_tokens] == [len(views[0].patches)], (seed, scale)


def test_views_patch_content_matches_crop():
    img = np.random.default_rng(2).uniform(-1, 1, (1, 224, 224)).astype(np.float32)
    views = sample_views(
        img,
        np.random.default_rng(0),
        sample=0,
        modality=0,
        flips=(0.0, 0.0, 0.0),
        n_global=1,
        n_local=0,
        global_scale=(1.0, 1.0),
    )
    v = views[0]
    assert v.num_tokens == 256
    np.testing.assert_array_equal(v.patches[0].reshape(PATCH, PATCH), img[0, :PATCH, :PATCH])


def test_views_deterministic_across_runs():
    img = np.random.default_rng(3).uniform(-1, 1, (64, 112, 112)).astype(np.float32)
    a = sample_views(img, np.random.default_rng([7, 1, 42, 0]), sample=0, modality=1, **VK)
    b = sample_views(img, np.random.default_rng([7, 1, 42, 0]), sample=0, modality=1, **VK)
    c = sample_views(img, np.random.default_rng([7, 1, 43, 0]), sample=0, modality=1, **VK)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.patches, y.patches)
        np.testing.assert_array_equal(x.coords, y.coords)
    assert any(
        x.patches.shape != y.patches.shape or not np.array_equal(x.patches, y.patches)
        for x, y in zip(a, c)
    )


def test_whole_view():
    img = np.zeros((1, 224, 187), np.float32)
    v = whole_view(img, sample=4, modality=0)
    assert v.num_tokens == 16 * 13 and v.index == 0 and v.is_global and v.sample == 4
