"""PyTorch model (mmv_jax.torch) vs mmv_jax, fp32 on CPU, same weights, same packed
mixed 2D/3D batch: per-view embeddings, LeJEPA loss and SIGReg (same directions), gradients."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)

import convert_torch as ct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import synthetic_batch  # noqa: E402

import mmv_jax.torch as tr  # noqa: E402
from mmv_jax.model.encoder import encoder_config  # noqa: E402
from mmv_jax.model.heads import MultiMedVision  # noqa: E402
from mmv_jax.objectives import lejepa  # noqa: E402

PROJ = dict(proj_hidden=64, proj_dim=16, proj_layers=3)
NUM_SAMPLES, NUM_VIEWS, SLICES = 4, 6, 32
KEY = jax.random.PRNGKey(11)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _perturbed_jax_model():
    """Ti/14 depth 2 with every bias and norm param randomised (so each tensor's mapping counts)."""
    model = MultiMedVision(
        encoder_config("Ti/14", depth=2, attention_impl="xla"), **PROJ, rngs=nnx.Rngs(0)
    )
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(1)
    pure = jax.tree.map(
        lambda x: (
            x
            + (
                0.1 * rng.standard_normal(x.shape).astype(np.float32)
                if x.ndim == 1 or x.shape == (3, 3, 64)
                else 0.0
            )
        ),
        pure,
    )
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _perturbed_jax_model()
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tmodel = tr.MultiMedVisionTorch(width=192, depth=2, heads=3, **PROJ)
    tmodel.load_state_dict(
        {k: torch.tensor(v) for k, v in ct.jax_to_torch(pure).items()}, strict=True
    )
    batch = synthetic_batch(
        num_samples=NUM_SAMPLES, n_global=2, n_local=4, rows=2, seq_len=96, slots=16, seed=3
    )
    assert batch.patches.shape[-1] == 14**3 and set(np.unique(batch.view_modality)) == {0, 1}
    assert (batch.segment_ids == 0).any()  # padding present
    return model, pure, tmodel, batch


@pytest.fixture(scope="module")
def jax_out(setup):
    """JAX embeddings, projections, loss, aux and gradients (one jit each, shared by impls)."""
    model, _, _, batch = setup
    jb = jax.tree.map(jnp.asarray, batch)
    graphdef, params = nnx.split(model, nnx.Param)
    emb, proj = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params, jb)
    loss, aux, grads = _jax_loss(model, jb, KEY)
    return np.asarray(emb), np.asarray(proj), loss, aux, grads


@pytest.mark.parametrize("impl", ["varlen", "mask"])
def test_embeddings_match(setup, jax_out, impl):
    _, _, tmodel, batch = setup
    emb_j, proj_j = jax_out[:2]
    with torch.no_grad():
        emb_t, proj_t = tmodel(batch, impl=impl)
    valid = batch.view_sample >= 0
    for ej, et in ((emb_j, emb_t), (proj_j, proj_t)):
        ej, et = np.asarray(ej)[valid], et.numpy()[valid]
        per_view = np.linalg.norm(et - ej, axis=-1) / np.linalg.norm(ej, axis=-1)
        assert per_view.max() <= 1e-4, per_view.max()
        print(impl, "worst per-view rel err", per_view.max())


def test_embeddings_match_2d_depth_slice_bucket(setup):
    model, _, tmodel, _ = setup
    b2d = synthetic_batch(num_samples=1, n_global=2, n_local=2, rows=1, seq_len=48, slots=8, seed=5)
    assert (b2d.view_modality[b2d.view_sample >= 0] == 0).all()  # sample 0 is 2D
    slim = b2d._replace(patches=np.ascontiguousarray(b2d.patches[..., : 14 * 14]))
    graphdef, params = nnx.split(model.encoder, nnx.Param)
    emb_j = np.asarray(
        jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params, jax.tree.map(jnp.asarray, slim))
    )
    with torch.no_grad():
        emb_t = tmodel.encode(slim, impl="varlen").numpy()
        emb_full = tmodel.encode(b2d, impl="varlen").numpy()
    assert _rel(emb_t, emb_j) <= 1e-4 and _rel(emb_full, emb_t) <= 1e-5


def _directions(key, dim, slices):
    """The directions lejepa.sigreg draws from ``key``."""
    return np.asarray(lejepa.sigreg_directions(key, dim, slices))


def test_sigreg_matches_given_directions():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 20, 16)).astype(np.float32) * 1.3 + 0.2
    mask = rng.uniform(size=(3, 20)) > 0.2
    key = jax.random.PRNGKey(7)
    a = _directions(key, 16, 64)
    for m in (None, mask):
        sj = float(lejepa.sigreg(z, key, num_slices=64, mask=m))
        sj2 = float(lejepa.epps_pulley(z @ a, mask=m).mean())
        st = float(
            tr.sigreg(torch.tensor(z), torch.tensor(a), mask=None if m is None else torch.tensor(m))
        )
        assert st == pytest.approx(sj, rel=1e-5) and sj2 == pytest.approx(sj, rel=1e-6)


def _jax_loss(model, batch, key):
    graphdef, state = nnx.split(model, nnx.Param)

    def f(params):
        _, proj = nnx.merge(graphdef, params)(batch)
        return lejepa.lejepa_loss(
            proj,
            batch.view_sample,
            batch.view_is_global,
            batch.view_index,
            num_samples=NUM_SAMPLES,
            num_views=NUM_VIEWS,
            key=key,
            num_slices=SLICES,
        )

    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return float(loss), {k: float(v) for k, v in aux.items()}, nnx.to_pure_dict(grads)


def _torch_loss(tmodel, batch, directions, impl):
    tmodel.zero_grad()
    _, proj = tmodel(batch, impl=impl)
    loss, aux = tr.lejepa_loss(
        proj,
        batch.view_sample,
        batch.view_is_global,
        batch.view_index,
        num_samples=NUM_SAMPLES,
        num_views=NUM_VIEWS,
        directions=torch.tensor(directions),
    )
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters()}
    return float(loss.detach()), {k: float(v.detach()) for k, v in aux.items()}, grads


@pytest.mark.parametrize("impl", ["varlen", "mask"])
def test_loss_and_gradients_match(setup, jax_out, impl):
    _, pure, tmodel, batch = setup
    loss_j, aux_j, grads_j = jax_out[2:]
    loss_t, aux_t, grads_t = _torch_loss(
        tmodel, batch, _directions(KEY, PROJ["proj_dim"], SLICES), impl
    )
    assert loss_t == pytest.approx(loss_j, rel=1e-4)
    assert aux_t["pred_loss"] == pytest.approx(aux_j["pred_loss"], rel=1e-4)
    assert aux_t["sigreg_loss"] == pytest.approx(aux_j["sigreg_loss"], rel=1e-4)
    grads_t, _ = ct.torch_to_jax(grads_t, pure)  # into JAX layouts, every tensor mapped
    flat_j, flat_t = ct.flatten(jax.tree.map(np.asarray, grads_j)), ct.flatten(grads_t)
    assert flat_j.keys() == flat_t.keys()
    total = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in flat_j.values()))
    # Biases whose shift the projector's BatchNorm removes (a hidden Dense's, the final norm's)
    # have analytically zero gradients: both sides hold rounding noise, compared to the total.
    tiny = {k for k, v in flat_j.items() if np.linalg.norm(v) < 1e-6 * total}
    assert all(k[-1] == "bias" for k in tiny) and len(tiny) <= 3, tiny
    for k in tiny:
        assert np.linalg.norm(flat_t[k] - flat_j[k]) <= 1e-6 * total, k
    errors = {"/".join(map(str, k)): _rel(flat_t[k], flat_j[k]) for k in flat_j if k not in tiny}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-3, (worst, errors[worst])
    print(f"{impl}: loss {loss_t} vs {loss_j}; worst grad rel err {worst} {errors[worst]:.2e}")
    assert all(np.linalg.norm(v) > 0 for v in flat_j.values())


def test_layernorm_projector_matches():
    from mmv_jax.model.heads import Projector

    jp = Projector(24, 40, 8, 3, norm="layer", rngs=nnx.Rngs(2))
    tp = tr.model.Projector(24, 40, 8, 3, 1e-6, "layer")
    pure = {"projector": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(jp, nnx.Param)))}
    sd = {k[len("projector.") :]: torch.tensor(v) for k, v in ct.jax_to_torch(pure).items()}
    tp.load_state_dict(sd, strict=True)
    x = np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    with torch.no_grad():
        yt = tp(torch.tensor(x), torch.tensor(mask)).numpy()
    assert _rel(yt, np.asarray(jp(jnp.asarray(x), jnp.asarray(mask)))) <= 1e-5
