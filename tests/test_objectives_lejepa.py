"""LeJEPA objective: Epps-Pulley / SIGReg against an independent numpy evaluation, prediction
loss against a naive loop on a packed layout, gradients, and sharded == single-device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.objectives import lejepa


def np_epps_pulley(x, t_max=3.0, knots=17):
    """x [N, K] -> [K]: N * 2 * trapezoid_0^tmax |ecf(t) - e^{-t^2/2}|^2 e^{-t^2/2} dt."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    t = np.linspace(0.0, t_max, knots)
    out = []
    for k in range(x.shape[1]):
        ecf = np.exp(1j * np.outer(t, x[:, k])).mean(axis=1)  # [T] complex
        integrand = np.abs(ecf - np.exp(-(t**2) / 2)) ** 2 * np.exp(-(t**2) / 2)
        out.append(n * 2.0 * np.trapezoid(integrand, t))
    return np.array(out)


def directions(key, d, k):
    a = np.asarray(jax.random.normal(key, (d, k), jnp.float32), np.float64)
    return a / np.linalg.norm(a, axis=0, keepdims=True)


def test_epps_pulley_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 7)) * np.array([0.2, 0.5, 1.0, 1.0, 2.0, 3.0, 1.0]) + 0.3
    got = np.asarray(lejepa.epps_pulley(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, np_epps_pulley(x), rtol=2e-4, atol=1e-5)
    got9 = np.asarray(lejepa.epps_pulley(jnp.asarray(x, jnp.float32), t_max=2.0, knots=9))
    np.testing.assert_allclose(got9, np_epps_pulley(x, 2.0, 9), rtol=2e-4, atol=1e-5)
    # leading batch dims; mask = all ones is the same statistic
    xb = np.stack([x, x[::-1] * 2])
    got_b = np.asarray(lejepa.epps_pulley(jnp.asarray(xb, jnp.float32)))
    np.testing.assert_allclose(got_b[1], np_epps_pulley(xb[1]), rtol=2e-4, atol=1e-5)
    got_m = np.asarray(lejepa.epps_pulley(jnp.asarray(xb, jnp.float32), mask=np.ones((2, 64))))
    np.testing.assert_allclose(got_m, got_b, rtol=1e-5)
    # a mask leaves samples out: equals the statistic of the kept samples
    m = np.zeros(64, bool)
    m[::3] = True
    got_sub = np.asarray(lejepa.epps_pulley(jnp.asarray(x, jnp.float32), mask=m))
    np.testing.assert_allclose(got_sub, np_epps_pulley(x[m]), rtol=2e-4, atol=1e-5)


def test_sigreg_matches_numpy_views():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 40, 16)) * 0.7 + 0.1  # [V, N, D]
    key = jax.random.key(3)
    a = directions(key, 16, 32)
    want = np.mean([np_epps_pulley(z[v] @ a) for v in range(3)])
    got = float(lejepa.sigreg(jnp.asarray(z, jnp.float32), key, num_slices=32))
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_sigreg_gaussian_small_collapsed_large():
    key = jax.random.key(0)
    z = jax.random.normal(jax.random.key(1), (512, 64))
    gauss = float(lejepa.sigreg(z, key))
    collapsed = float(lejepa.sigreg(jnp.tile(z[:1], (512, 1)), key))
    scaled = float(lejepa.sigreg(z * 0.1, key))
    # under H0, N * E|ecf - phi|^2 = 1 - phi(t)^2, so the statistic is about
    # int_{-3}^{3} (1 - e^{-t^2}) e^{-t^2/2} dt = 1.05
    assert 0.5 < gauss < 2.0, gauss
    assert collapsed > 50.0 and collapsed > 100 * gauss, (gauss, collapsed)
    assert scaled > 20 * gauss


def random_layout(rng, num_samples=5, num_views=4, num_global=2, rows=4, slots=8, dim=6):
    """Every (sample, view) placed in a random slot of a random row; rest empty."""
    total = rows * slots
    pos = rng.permutation(total)[: num_samples * num_views]
    vs = np.full(total, -1, np.int32)
    vi = np.full(total, -1, np.int32)
    vg = np.zeros(total, bool)
    for p, (s, v) in zip(pos, [(s, v) for s in range(num_samples) for v in range(num_views)]):
        vs[p], vi[p], vg[p] = s, v, v < num_global
    emb = rng.normal(size=(total, dim)).astype(np.float32)
    emb[vs < 0] = np.nan  # empty slots must not matter
    shape = (rows, slots)
    return emb.reshape(rows, slots, dim), vs.reshape(shape), vg.reshape(shape), vi.reshape(shape)


def naive_pred(emb, vs, vg, reduce="sum"):
    e, s, g = emb.reshape(-1, emb.shape[-1]), vs.reshape(-1), vg.reshape(-1)
    losses = []
    for sample in sorted(set(s[s >= 0].tolist())):
        views = [i for i in range(len(s)) if s[i] == sample]
        mu = np.mean([e[i] for i in views if g[i]], axis=0)
        per = [
            np.sum((mu - e[i]) ** 2) if reduce == "sum" else np.mean((mu - e[i]) ** 2)
            for i in views
        ]
        losses.append(np.mean(per))
    return float(np.mean(losses))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_prediction_loss_matches_naive_loop(reduce):
    rng = np.random.default_rng(2)
    emb, vs, vg, vi = random_layout(rng)
    got = float(lejepa.prediction_loss(emb, vs, vg, num_samples=5, pred_reduce=reduce))
    np.testing.assert_allclose(got, naive_pred(emb, vs, vg, reduce), rtol=1e-5)


def test_lejepa_loss_total_scatter_and_grad():
    rng = np.random.default_rng(4)
    emb, vs, vg, vi = random_layout(rng)
    key = jax.random.key(7)
    fn = jax.jit(
        lambda e: lejepa.lejepa_loss(
            e, vs, vg, vi, num_samples=5, num_views=4, key=key, num_slices=16
        )
    )
    loss, aux = fn(emb)
    # SIGReg on the dense [num_views, num_samples, D] tensor built by a loop
    dense = np.zeros((4, 5, emb.shape[-1]), np.float32)
    for r in range(vs.shape[0]):
        for j in range(vs.shape[1]):
            if vs[r, j] >= 0:
                dense[vi[r, j], vs[r, j]] = emb[r, j]
    want_sig = float(lejepa.sigreg(jnp.asarray(dense), key, num_slices=16))
    want_pred = naive_pred(emb, vs, vg)
    np.testing.assert_allclose(float(aux["sigreg_loss"]), want_sig, rtol=1e-5)
    np.testing.assert_allclose(float(aux["pred_loss"]), want_pred, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.975 * want_pred + 0.025 * want_sig, rtol=1e-5)
    assert int(aux["num_views"]) == 20
    grad = jax.grad(lambda e: fn(e)[0])(emb)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[vs < 0] == 0)
    assert np.abs(grad[vs >= 0]).sum() > 0


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mmv_jax.objectives import lejepa
    rng = np.random.default_rng(0)
    R, V, D, S, NV = 8, 6, 8, 8, 4
    pos = rng.permutation(R * V)[:S * NV]
    vs = np.full(R * V, -1, np.int32); vi = np.full(R * V, -1, np.int32)
    for p, (s, v) in zip(pos, [(s, v) for s in range(S) for v in range(NV)]):
        vs[p], vi[p] = s, v
    vg = (vi >= 0) & (vi < 2)
    emb = rng.normal(size=(R, V, D)).astype(np.float32)
    args = (emb, vs.reshape(R, V), vg.reshape(R, V), vi.reshape(R, V))
    key = jax.random.key(0)
    f = lambda e, s, g, i: lejepa.lejepa_loss(e, s, g, i, num_samples=S, num_views=NV,
                                              key=key, num_slices=32)[0]
    ref = float(jax.jit(f)(*args))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    out = float(jax.jit(f, in_shardings=(sh,) * 4)(*[jax.device_put(a, sh) for a in args]))
    assert len(jax.devices()) == 4
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    print("OK", ref, out)
""")


def test_sharded_equals_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", SHARDED],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=120,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
