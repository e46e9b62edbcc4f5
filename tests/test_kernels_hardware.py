"""The attention kernels on real accelerators against the dense reference, forward and gradients
(the CPU suite checks the Triton kernels under Triton's interpreter and Pallas in interpret mode;
only a device runs the compiled kernels). Deselected by default; on a machine with one:

    JAX_PLATFORMS=cuda pytest -m gpu tests/test_kernels_hardware.py
    JAX_PLATFORMS=tpu pytest -m tpu tests/test_kernels_hardware.py

(tests/conftest.py defaults JAX_PLATFORMS to cpu, hence the explicit platform.) A selected test
fails, rather than skips, when its accelerator is not what JAX runs on: asking for it and
getting nothing checked should not look like a pass. Tolerances as in tools/device_check.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.kernels.attention import segment_attention
from mmv_jax.kernels.reference import outputs_and_grads, segment_attention_reference

S, H = 512, 2


def _layouts():
    rows = np.zeros((3, S), np.int32)
    pos = 0
    for sid, n in enumerate((100, 1, 60, 1, 1, 200), start=1):  # block edges crossed; padded tail
        rows[0, pos : pos + n] = sid
        pos += n
    rows[1] = np.arange(1, S + 1)  # one-token segments ...
    rows[1, 70:140] = 0  # ... around a padding run
    rows[2] = 7  # one segment fills the row
    return jnp.asarray(rows)


def _check(platform, impl, head_dim, dtype):
    backend = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else jax.default_backend()
    assert backend == platform, (
        f"-m {platform} selected but JAX runs on {backend!r}: run with "
        f"JAX_PLATFORMS={'cuda' if platform == 'gpu' else platform}"
    )
    seg = _layouts()
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal((3, S, H, head_dim)), jnp.float32).astype(dtype)
        for _ in range(3)
    )
    cand = lambda q, k, v, s: segment_attention(q, k, v, s, impl=impl)
    want = outputs_and_grads(segment_attention_reference, q, k, v, seg, reference=True)
    got = outputs_and_grads(cand, q, k, v, seg)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.isfinite(g).all(), name
        assert not g[1, 70:140].any(), f"{name}: padding rows must be zero"
        if dtype == jnp.float32:
            err = np.abs(g - r).max()
            assert err <= 1e-4, f"{name}: max abs error {err:.2e}"
        else:
            err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
            assert err <= 2e-2, f"{name}: relative L2 error {err:.2e}"


CASES = [(d, dt) for d in (64, 128) for dt in (jnp.bfloat16, jnp.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton_gpu", "xla"])
@pytest.mark.parametrize("head_dim,dtype", CASES)
def test_gpu_kernels_match_the_reference(impl, head_dim, dtype):
    _check("gpu", impl, head_dim, dtype)


@pytest.mark.tpu
@pytest.mark.parametrize("impl", ["pallas_tpu", "xla"])
@pytest.mark.parametrize("head_dim,dtype", CASES)
def test_tpu_kernels_match_the_reference(impl, head_dim, dtype):
    _check("tpu", impl, head_dim, dtype)
