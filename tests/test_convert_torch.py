"""tools/convert_torch.py: PyTorch state_dict <-> Orbax checkpoint, exact both ways; untrusted
input (weights_only), Lightning nesting and prefixes, refusals named by tensor."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tools"))

import convert_torch as ct  # noqa: E402
import jax  # noqa: E402
from flax import nnx  # noqa: E402

import mmv_jax.torch as tr  # noqa: E402
from mmv_jax.model.encoder import encoder_config  # noqa: E402
from mmv_jax.model.heads import MultiMedVision  # noqa: E402

PROJ = dict(proj_hidden=32, proj_dim=8, proj_layers=2)
CLI_OVERRIDES = [
    "--config.model.depth=1",
    "--config.model.proj_hidden=32",
    "--config.model.proj_dim=8",
    "--config.model.proj_layers=2",
    "--config.seed=5",
]


def _jax_params(seed=0):
    model = MultiMedVision(encoder_config("Ti/14", depth=1), **PROJ, rngs=nnx.Rngs(seed))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _torch_model(seed=0):
    torch.manual_seed(seed)
    m = tr.MultiMedVisionTorch(width=192, depth=1, heads=3, **PROJ)
    with torch.no_grad():  # non-trivial norms and biases
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_trees_equal(a, b):
    fa, fb = ct.flatten(a), ct.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_name_map_matches_torch_reference_and_round_trips_exactly():
    params = _jax_params()
    sd = ct.jax_to_torch(params)
    ref = tr.MultiMedVisionTorch(width=192, depth=1, heads=3, **PROJ).state_dict()
    assert list(sd) == list(ref)  # same names, in the PyTorch module's order
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sd["patch_embed.proj.weight"].shape == (192, 1, 14, 14, 14)
    assert sd["blocks.0.attn.qkv.weight"].shape == (576, 192)
    back, report = ct.torch_to_jax(sd, params)
    assert report["mapped"] == len(sd) and not report["allowed_missing"]
    _assert_trees_equal(back, params)
    # the qkv layout: torch output row (t, h, k) in C order is JAX kernel[:, t, h, k]
    k = params["encoder"]["blocks"][0]["attn"]["qkv"]
    np.testing.assert_array_equal(
        sd["blocks.0.attn.qkv.weight"][1 * 192 + 2 * 64 + 5], k[:, 1, 2, 5]
    )


def test_cli_round_trip_through_orbax_and_init_from(tmp_path, capsys):
    from mmv_jax.train import checkpoint, sharding as shd, state as st

    tmodel = _torch_model()
    original = _sd(tmodel)
    src = str(tmp_path / "model.safetensors")
    ct.save_torch_state(original, src)
    cfg_file = os.path.join(_ROOT, "configs", "demo.py")

    run1 = str(tmp_path / "ckpt1")
    assert (
        ct.main(["torch2jax", "--in", src, "--config", cfg_file, "--out", run1] + CLI_OVERRIDES)
        == 0
    )
    # what the train loop does with --config.init_from=run1
    cfg = ct.load_config(cfg_file, CLI_OVERRIDES)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    abstract = nnx.state(nnx.eval_shape(lambda: st.build_model(cfg)), nnx.Param)
    p_shard = shd.param_shardings(abstract, mesh, shd.rules_dict(cfg.mesh.rules))
    loaded = checkpoint.load_params(run1, checkpoint.abstract_of(abstract, p_shard))
    loaded = jax.tree.map(np.asarray, nnx.to_pure_dict(loaded))
    expect, _ = ct.torch_to_jax(original, loaded)
    _assert_trees_equal(loaded, expect)

    back = str(tmp_path / "back.safetensors")
    assert ct.main(["jax2torch", "--in", run1, "--out", back]) == 0
    again = ct.load_torch_state(back)
    assert again.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(again[k], original[k], err_msg=k)

    again_jax, _ = ct.torch_to_jax(again, loaded)  # JAX -> PyTorch -> JAX
    _assert_trees_equal(again_jax, ct.load_jax_params(run1))
    capsys.readouterr()

    # an encoder-only checkpoint is refused by name, then accepted with --allow-missing
    enc_only = str(tmp_path / "encoder.safetensors")
    ct.save_torch_state(
        {k: v for k, v in original.items() if not k.startswith("projector.")}, enc_only
    )
    run3 = str(tmp_path / "ckpt3")
    args = ["torch2jax", "--in", enc_only, "--config", cfg_file, "--out", run3] + CLI_OVERRIDES
    assert ct.main(args) == 2
    err = capsys.readouterr().err
    assert "refusing a partial conversion" in err and "projector.out.weight" in err
    assert not os.path.exists(os.path.join(run3, "0"))
    assert ct.main(args + ["--allow-missing", "projector.*"]) == 0
    p3 = ct.load_jax_params(run3)
    np.testing.assert_array_equal(p3["encoder"]["norm"]["scale"], original["norm.weight"])
    fresh = st.build_model(cfg, seed=cfg.seed).projector.out.kernel[...]  # keeps the fresh init
    np.testing.assert_allclose(p3["projector"]["out"]["kernel"], np.asarray(fresh), rtol=1e-6)


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod.", "module."])
def test_lightning_checkpoint_nested_state_dict_and_prefix(tmp_path, prefix):
    sd = _sd(_torch_model())
    path = str(tmp_path / "last.ckpt")
    stats = {
        "projector.norms.0.running_mean": np.zeros(32, np.float32),  # nn.BatchNorm1d buffers
        "projector.norms.0.running_var": np.ones(32, np.float32),
        "projector.norms.0.num_batches_tracked": np.zeros((), np.int64),
    }
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + k: torch.from_numpy(v) for k, v in {**sd, **stats}.items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
            "hyper_parameters": {"lr": 1e-4, "variant": "Ti/14"},
        },
        path,
    )
    params = _jax_params()
    state = ct.strip_prefix(ct.load_torch_state(path), ct.name_map(params))
    assert set(state) == set(sd) | set(stats)
    out, report = ct.torch_to_jax(state, params)
    assert report["ignored"] == sorted(stats)
    _assert_trees_equal(ct.jax_to_torch(out), sd)
    plain = str(tmp_path / "plain.pt")  # jax2torch's .pt output loads back with weights_only
    ct.save_torch_state(ct.jax_to_torch(out), plain)
    _assert_trees_equal(ct.load_torch_state(plain), sd)


_RAN = []


def _payload():
    _RAN.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"norm.weight": torch.ones(3)}, "extra": _Evil()}, path)
    with pytest.raises(ct.ConversionError, match="refusing to load"):
        ct.load_torch_state(path)
    assert not _RAN


def test_missing_unmapped_and_misshaped_are_named():
    params = _jax_params()
    sd = dict(ct.jax_to_torch(params))
    del sd["projector.out.weight"]
    sd["head.weight"] = np.zeros((10, 192), np.float32)
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-1]
    with pytest.raises(ct.ConversionError) as e:
        ct.torch_to_jax(sd, params)
    msg = str(e.value)
    for name in ("projector.out.weight", "head.weight", "blocks.0.attn.qkv.weight: got (575, 192)"):
        assert name in msg
    sd["blocks.0.attn.qkv.weight"] = ct.jax_to_torch(params)["blocks.0.attn.qkv.weight"]
    with pytest.raises(ct.ConversionError, match="head.weight"):
        ct.torch_to_jax(sd, params, allow_missing=["projector.out.*"])
    out, report = ct.torch_to_jax(sd, params, allow_missing=["projector.out.*"], ignore=["head.*"])
    assert report["allowed_missing"] == ["projector.out.weight"] and report["ignored"] == [
        "head.weight"
    ]
    _assert_trees_equal(out, params)
