"""Useful FLOPs and the MFU denominator (train/metrics.py).

The expected counts are not the formula copied back: XLA counts the FLOPs of a matmul-only
skeleton of the encoder (its dot products, no elementwise work), built per segment so that
attention is block-diagonal; the dense part is also checked against "2 FLOPs per weight per
token" over the real Encoder's parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmv_jax.batch import PATCH, PackedBatch
from mmv_jax.model.encoder import Encoder, encoder_config
from mmv_jax.train import metrics


def _xla_flops(fn, *shapes):
    """FLOPs XLA counts for ``fn`` on float32 arguments of ``shapes`` (nothing runs)."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _skeleton_flops(width, depth, heads, mlp_ratio, seg_lengths, modalities):
    """The encoder's matmuls, one segment at a time: patch embed (P^3 inputs for a 3D view, the
    kernel's depth-0 slice of P^2 rows for a 2D one), then per block qkv, q.k^T and p.v within
    the segment, the output projection and the two MLP layers. XLA counts 2 FLOPs per
    multiply-add of each dot; slicing and reshapes cost none."""
    k = width // heads

    def fn(embed, qkv, proj, fc1, fc2, *xs):
        out = []
        for x in xs:
            h = x @ embed[: x.shape[-1]]
            for _ in range(depth):
                q, kk, v = (t.reshape(-1, heads, k) for t in jnp.split(h @ qkv, 3, axis=-1))
                s = jnp.einsum("qhd,khd->hqk", q, kk)
                h = jnp.einsum("hqk,khd->qhd", s, v).reshape(-1, width) @ proj @ fc1 @ fc2
            out.append(h)
        return out

    shapes = [
        (PATCH**3, width),
        (width, 3 * width),
        (width, width),
        (width, mlp_ratio * width),
        (mlp_ratio * width, width),
    ]
    shapes += [(n, PATCH**3 if m == 1 else PATCH**2) for n, m in zip(seg_lengths, modalities)]
    return _xla_flops(fn, *shapes)


@pytest.mark.parametrize(
    "width,depth,heads,mlp_ratio,segs,mods",
    [
        (12, 1, 3, 4, [5], [0]),
        (12, 2, 3, 4, [5, 3, 7], [0, 1, 1]),  # block-diagonal: 25 + 9 + 49, not 15^2
        (16, 3, 2, 2, [2, 4, 4, 9], [1, 0, 1, 0]),  # (length-1 segments: XLA rewrites the dot)
    ],
)
def test_encoder_flops_equal_xla_count_of_the_matmuls(width, depth, heads, mlp_ratio, segs, mods):
    want = _skeleton_flops(width, depth, heads, mlp_ratio, segs, mods)
    assert metrics.encoder_flops(width, depth, mlp_ratio, segs, mods) == pytest.approx(
        want, rel=1e-9
    )


def test_dense_flops_are_two_per_weight_per_token_of_the_real_encoder():
    """Per token and block, the dense FLOPs are twice the block's matmul weights (biases, norms
    and attention aside); the embed is twice the P^3 (3D) or P^2 (2D) rows of its kernel."""
    cfg = encoder_config("Ti/14", depth=2)
    enc = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
    weights = {
        "/".join(map(key, path)): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(enc, nnx.Param))[0]
    }
    block = sum(
        int(np.prod(s))
        for name, s in weights.items()
        if name.startswith("blocks/0/") and len(s) >= 2 and "bias" not in name
    )
    embed = [s for name, s in weights.items() if name.startswith("patch_embed") and len(s) == 2]
    assert embed == [(PATCH**3, cfg.width)]
    attention = lambda n: 4.0 * cfg.width * n * n * cfg.depth  # q.k^T and p.v over n keys
    for n, mod, embed_rows in ((1, 1, PATCH**3), (1, 0, PATCH**2), (10, 0, PATCH**2)):
        got = metrics.encoder_flops(cfg.width, cfg.depth, cfg.mlp_ratio, [n], [mod])
        want = n * (2.0 * embed_rows * cfg.width + cfg.depth * 2.0 * block) + attention(n)
        assert got == pytest.approx(want, rel=1e-12), (n, mod)


def _packed(segment_rows, modality_rows, patch_dim=PATCH**3):
    """A PackedBatch with these segment ids and view modalities (the rest zeros)."""
    seg = np.asarray(segment_rows, np.int32)
    mod = np.asarray(modality_rows, np.int32)
    (r, s), v = seg.shape, mod.shape[1]
    return PackedBatch(
        np.zeros((r, s, patch_dim), np.float32),
        seg,
        np.zeros((r, s, 3), np.float32),
        np.where(mod >= 0, 0, -1).astype(np.int32),
        np.zeros((r, v), bool),
        np.maximum(mod, 0),
        np.zeros((r, v), np.int32),
    )


def test_batch_flops_count_each_view_once_and_padding_never():
    w, d, r = 12, 2, 4
    view = lambda n, m: metrics.encoder_flops(w, d, r, [n], [m])
    # row 0: a 3-token 2D view, padding, a 2-token 3D view in slot 2 (slot 1 empty);
    # row 1: a 4-token 3D view and a 1-token 2D view; row 2: padding only
    b = _packed(
        [[1, 1, 1, 0, 3, 3, 0, 0], [1, 1, 1, 1, 2, 0, 0, 0], [0] * 8],
        [[0, -1, 1], [1, 0, -1], [-1, -1, -1]],
    )
    want = 3 * (view(3, 0) + view(2, 1) + view(4, 1) + view(1, 0))  # forward + backward
    assert metrics.batch_flops(b, w, d, r) == pytest.approx(want, rel=1e-12)
    # a train batch: row groups (2D rows P^2 wide, then 3D rows) add up
    g2d = _packed([[1, 1, 2, 2, 2, 0]], [[0, 0]], patch_dim=PATCH**2)
    g3d = _packed([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], [[1, -1], [1, -1]])
    want = 3 * (view(2, 0) + view(3, 0) + view(5, 1) + view(2, 1))
    assert metrics.batch_flops((g2d, g3d), w, d, r) == pytest.approx(want, rel=1e-12)


class _Device:
    def __init__(self, kind, platform="tpu", process_index=0):
        self.device_kind, self.platform, self.process_index = kind, platform, process_index


@pytest.mark.parametrize(
    "kind,per_chip",
    [  # vendor dense bf16 figures
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA H200", 989e12),
    ],
)
def test_peak_flops_is_the_vendor_figure_times_the_devices(monkeypatch, kind, per_chip):
    monkeypatch.setattr(
        jax, "devices", lambda *a: [_Device(kind, "gpu" if "NVIDIA" in kind else "tpu")] * 4
    )
    assert metrics.peak_flops() == pytest.approx(4 * per_chip)
    assert metrics.peak_flops(override=1e12) == pytest.approx(4e12)  # config: per device


def test_peak_flops_of_unknown_accelerators_and_cpus(monkeypatch, caplog):
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device("Frobnicator 9000", "gpu")] * 2)
    assert metrics.peak_flops() == 2e15
    assert "peak_flops_per_device" in caplog.text  # the warning says what to set
    # CPU: one measured matmul per process, not per forced host "device" (they share the cores)
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device("cpu", "cpu")] * 8)
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda **kw: 5e10)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert metrics.peak_flops() == 1e11


def test_measured_matmul_peak_is_the_flops_of_one_timed_matmul(monkeypatch):
    import types

    clock = iter(np.arange(0.0, 100.0, 0.5))  # every timed matmul takes 0.5 s
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert metrics.measure_matmul_peak(n=64, reps=3) == pytest.approx(2 * 64**3 / 0.5)
