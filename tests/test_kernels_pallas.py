"""Pallas TPU segment attention: interpret mode vs the dense reference (CPU), and a real TPU
compile, dispatched by impl="auto" from the TPU mesh's platform.

The interpret-mode tests use small shapes (S <= 512, block 128): the Pallas interpreter is slow.
The compile test builds the real Mosaic kernels for a TPU topology from CPU (needs libtpu,
which the `test` extra installs as jax[tpu]); it runs in a subprocess so libtpu's set-up does
not leak into the rest of the suite.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.kernels import pallas_tpu
from mmv_jax.kernels.pallas_tpu import segment_attention_pallas
from mmv_jax.kernels.reference import segment_attention_reference

S, H, D = 384, 2, 64


def _layouts(s=S):
    """Rows covering: padding at the end and in the middle, one-token segments, segments that
    cross block boundaries, a row of one segment, and an all-padding row."""
    rows = np.zeros((5, s), np.int32)
    # mixed lengths crossing the 128-token block boundaries, trailing padding
    pos, sid = 0, 0
    for n in (100, 1, 60, 1, 1, 90, 40):
        sid += 1
        rows[0, pos : pos + n] = sid
        pos += n
    # one-token segments everywhere, with a padding run in the middle
    rows[1, :] = np.arange(1, s + 1)
    rows[1, 150:170] = 0
    # a row of one segment
    rows[2, :] = 7
    # padding in the middle covering a whole block (segments 1 and 2 on either side)
    rows[3, :120] = 1
    rows[3, 120:260] = 0
    rows[3, 260:] = 2
    # random packed row with padding runs and non-monotone ids (skipping stays conservative)
    rng = np.random.default_rng(3)
    pos, ids = 0, list(rng.permutation(np.arange(1, 60)))
    while pos < s:
        n = int(rng.integers(1, 70))
        if rng.random() > 0.2:
            rows[4, pos : pos + n] = ids.pop()
        pos += n
    return rows


def _reference(q, k, v, seg):
    """The dense definition in fp32 (and fp32 out, so bf16 kernels are compared to fp32 math)."""
    return segment_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg)


def _inputs(dtype, seg, h=H, d=D, seed=0):
    rng = np.random.default_rng(seed)
    b, s = seg.shape
    qkv = [
        jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32).astype(dtype) for _ in range(3)
    ]
    return qkv, jnp.asarray(seg)


def _loss(fn, seg, d):
    w = jnp.cos(jnp.arange(d, dtype=jnp.float32))
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * w)


def _kernel(**kw):
    return lambda q, k, v, seg: segment_attention_pallas(q, k, v, seg, interpret=True, **kw)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_forward_and_grad_fp32():
    seg = _layouts()
    (q, k, v), segj = _inputs(jnp.float32, seg)
    out = segment_attention_pallas(q, k, v, segj, interpret=True)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(_reference(q, k, v, segj)), atol=1e-5, rtol=0
    )
    assert not np.asarray(out)[seg == 0].any()  # padding query rows are exactly zero
    g = jax.grad(_loss(_kernel(), segj, D), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(_reference, segj, D), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=name)
        assert not np.asarray(a)[seg == 0].any(), name  # padding tokens get zero gradients


def test_forward_and_grad_bf16():
    seg = _layouts()
    (q, k, v), segj = _inputs(jnp.bfloat16, seg, seed=1)
    out = segment_attention_pallas(q, k, v, segj, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, _reference(q, k, v, segj)) <= 2e-2
    g = jax.grad(_loss(_kernel(), segj, D), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(_reference, segj, D), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v))
    )
    for name, a, b in zip("qkv", g, g_ref):
        assert a.dtype == jnp.bfloat16
        assert _rel(a, b) <= 2e-2, name


def test_rectangular_blocks_and_other_head_dim():
    seg = _layouts(512)[[0, 3]]
    (q, k, v), segj = _inputs(jnp.float32, seg, h=1, d=32, seed=2)
    kern = _kernel(block_q=128, block_k=256)
    np.testing.assert_allclose(
        np.asarray(kern(q, k, v, segj)), _reference(q, k, v, segj), atol=1e-5
    )
    g = jax.grad(_loss(kern, segj, 32), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(_reference, segj, 32), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_skipped_blocks_are_never_read():
    """NaN in all-padding blocks would leak into every output if those blocks were visited."""
    seg = np.zeros((1, S), np.int32)
    seg[0, :100] = 1
    seg[0, 100:128] = 2
    seg[0, 256:300] = 3  # block 1 (128..255) is all padding
    (q, k, v), segj = _inputs(jnp.float32, seg, seed=4)
    nan_block1 = jnp.asarray(
        np.where(np.arange(S)[None, :, None, None] // 128 == 1, np.nan, 0.0), jnp.float32
    )
    qp, kp, vp = q + nan_block1, k + nan_block1, v + nan_block1
    out = segment_attention_pallas(qp, kp, vp, segj, interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, segj), atol=1e-5)
    g = jax.grad(_loss(_kernel(), segj, D), argnums=(0, 1, 2))(qp, kp, vp)
    for a in g:
        a = np.asarray(a)
        assert np.isfinite(a[:, :128]).all() and np.isfinite(a[:, 256:]).all()
        assert not a[:, 128:256].any()


def _short_segments_row(s, rng, max_len):
    row = np.zeros(s, np.int32)
    pos, sid = 0, 0
    while pos < s - 40:  # padding tail
        n = int(rng.integers(1, max_len + 1))
        sid += 1
        row[pos : pos + n] = sid
        pos += n
    return row


def test_max_segment_len_bounds_the_grid():
    """With max_segment_len the grid walks 3 of 6 k-blocks per q-block; results unchanged."""
    s, L = 768, 60
    assert pallas_tpu.span_bound(128, 128, L, s // 128) == 3
    rng = np.random.default_rng(5)
    seg = np.stack([_short_segments_row(s, rng, L), _short_segments_row(s, rng, 1)])
    seg[1, 300:420] = 0
    (q, k, v), segj = _inputs(jnp.float32, seg, h=1, seed=6)
    kern = _kernel(max_segment_len=L)
    np.testing.assert_allclose(
        np.asarray(kern(q, k, v, segj)), _reference(q, k, v, segj), atol=1e-5
    )
    g = jax.grad(_loss(kern, segj, D), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(_reference, segj, D), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_max_segment_len_violation_stays_correct():
    """A segment longer than the promised bound runs the unbounded grid: same values, gradients."""
    seg = np.zeros((2, 768), np.int32)
    seg[0, :700] = 1  # one 700-token segment, promised <= 60
    seg[1] = _short_segments_row(768, np.random.default_rng(8), 60)
    (q, k, v), segj = _inputs(jnp.float32, seg, h=1, seed=7)
    kern = _kernel(max_segment_len=60)
    np.testing.assert_allclose(
        np.asarray(kern(q, k, v, segj)), _reference(q, k, v, segj), atol=1e-5
    )
    g = jax.grad(_loss(kern, segj, D), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(_reference, segj, D), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_segment_len"):
        segment_attention_pallas(q, k, v, segj, interpret=True, max_segment_len=0)


@pytest.mark.parametrize(
    "kwargs,shape,dtype,match",
    [
        ({}, (1, 200, 2, 64), jnp.float32, "multiple of block_q=128"),
        ({}, (1, 256, 2, 64), jnp.float16, "float32 or bfloat16"),
        ({}, (1, 256, 2, 96 + 100), jnp.float32, "head dim"),
        ({"block_k": 64}, (1, 256, 2, 64), jnp.float32, "block_k=64 must be a positive multiple"),
    ],
)
def test_unsupported_requests_raise(kwargs, shape, dtype, match):
    x = jnp.zeros(shape, dtype)
    seg = jnp.ones(shape[:2], jnp.int32)
    with pytest.raises(ValueError, match=match):
        segment_attention_pallas(x, x, x, seg, interpret=True, **kwargs)


_COMPILE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mmv_jax.kernels.attention import resolve_platform, segment_attention

    topo = topologies.get_topology_desc("v5e:2x2", "tpu")
    n = len(topo.devices)
    mesh = topologies.make_mesh(topo, (n,), ("data",))
    platform = resolve_platform(mesh)  # "tpu" on this CPU host: impl="auto" picks the kernel
    assert platform == "tpu", platform
    spec = P("data")
    smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                                   check_vma=False)
    for S, H, L in ((4096, 6, None), (4096, 12, 512), (8192, 6, 512), (8192, 12, 512)):
        attn = smap(lambda q, k, v, s: segment_attention(q, k, v, s, platform=platform,
                                                         max_segment_len=L))
        loss = lambda q, k, v, s: jnp.sum(attn(q, k, v, s).astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
        qkv = sds((2 * n, S, H, 64), jnp.bfloat16)
        compiled = step.lower(qkv, qkv, qkv, sds((2 * n, S), jnp.int32)).compile()
        hlo = compiled.as_text()
        calls = hlo.count("custom_call_target=\\"tpu_custom_call\\"")
        # forward, dQ, dK/dV Mosaic kernels; with a bound, also the unbounded ones its run-time
        # check falls back to (lax.cond)
        assert calls == (3 if L is None else 6), (S, H, calls)
        print("compiled", topo.devices[0].device_kind, S, H, calls, flush=True)
""")


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install 'jax[tpu]'; the test extra has it)",
)
def test_compiles_for_tpu_topology():
    # ALLOW_MULTIPLE_LIBTPU_LOAD: compile-only use; do not contend for /tmp/libtpu_lockfile with
    # other processes that loaded libtpu (parallel test runs, other users).
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
    )
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count("compiled") == 4, r.stdout
