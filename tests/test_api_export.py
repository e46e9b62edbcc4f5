"""The Python API (mmv_jax.load_encoder) against mmv-embed on the demo data; checkpoint and step
selection; mmv-export round trips JAX -> folder -> JAX (<= 1e-5) and -> PyTorch (<= 1e-4) on a
CXR and a CT; mmv-export's refusals are one line; importing mmv_jax imports neither JAX nor torch."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

import mmv_jax
from mmv_jax import export
from mmv_jax.data import pipeline, synthetic
from mmv_jax.data.manifest import load_manifest
from mmv_jax.data.readers import ImageReadError, load_image
from mmv_jax.eval import embed as emb
from mmv_jax.train import checkpoint, sharding as shd, state as st

_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(manifest):
    cfg = tiny_config(**{"model.depth": 2})
    cfg.data = pipeline.demo_config()
    cfg.data.manifest = manifest
    return cfg


def _perturbed_state(cfg, seed):
    """A TrainState whose every bias and norm param is random too (so each mapping counts)."""
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    _, state, shardings = st.create(cfg, mesh, st.make_optimizer(cfg))
    pure = nnx.to_pure_dict(state.params)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(
        lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), pure
    )
    nnx.replace_by_pure_dict(state.params, pure)
    return state._replace(params=jax.device_put(state.params, shardings.params))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (config.json + checkpoints at steps 3 and 7 with different weights) and
    the demo data: 3 CXR (DICOM) + 2 CT (NIfTI)."""
    root = tmp_path_factory.mktemp("api")
    manifest = synthetic.make_demo_dataset(str(root / "data"), n_cxr=3, n_ct=2, seed=4)
    cfg = _cfg(manifest)
    workdir = root / "run"
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=3, async_save=False)
    for step, seed in ((3, 1), (7, 2)):
        ckpt.save(step, _perturbed_state(cfg, seed), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(cfg.to_json())
    return str(workdir), manifest, load_manifest(manifest)


@pytest.fixture(scope="module")
def mmv_embed(run, tmp_path_factory):
    workdir, manifest, _ = run
    out = str(tmp_path_factory.mktemp("emb") / "emb.npz")
    emb.main(["--checkpoint", workdir, "--manifest", manifest, "--out", out])
    return dict(np.load(out))


@pytest.fixture(scope="module")
def encoder(run):
    return mmv_jax.load_encoder(run[0])


def test_embed_equals_mmv_embed(run, mmv_embed, encoder):
    _, _, records = run
    assert encoder.step == 7 and encoder.dim == 192
    z = encoder.embed([r.path for r in records], spacing=[r.spacing for r in records])
    assert z.shape == (5, 192) and z.dtype == np.float32
    by_id = dict(zip(mmv_embed["ids"].tolist(), mmv_embed["embeddings"]))
    want = np.stack([by_id[r.id] for r in records])
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(z, want, atol=1e-5, rtol=0)
    # batches of 2 (other packing, a 2D-only batch) and one image alone give the same numbers
    z2 = encoder.embed(
        [r.path for r in records], spacing=[r.spacing for r in records], batch_size=2
    )
    np.testing.assert_allclose(z2, want, atol=1e-5, rtol=0)
    # the modality given (the manifest's route: load_preprocessed) or read from the image
    z3 = encoder.embed(
        [r.path for r in records],
        spacing=[r.spacing for r in records],
        modality=[r.modality for r in records],
    )
    np.testing.assert_allclose(z3, want, atol=1e-5, rtol=0)
    one = encoder.embed(records[4].path)
    np.testing.assert_allclose(one[0], want[4], atol=1e-5, rtol=0)


def test_arrays_equal_files(run, encoder):
    """An array in physical units with its spacing is the file: [H, W] X-ray, [Z, H, W] CT (HU)."""
    _, _, records = run
    cxr, ct = records[0], records[3]
    a = load_image(cxr.path, spacing=cxr.spacing)
    b = load_image(ct.path)
    z = encoder.embed([a.array[0], b.array], spacing=[a.spacing[1:], b.spacing])
    want = encoder.embed([cxr.path, ct.path], spacing=[cxr.spacing, None])
    np.testing.assert_allclose(z, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs spacing"):
        encoder.embed(b.array)
    with pytest.raises(ImageReadError, match=r"images\[0\]: non-finite"):
        encoder.embed([np.full((40, 40), np.nan)])
    with pytest.raises(ImageReadError, match="file not found"):
        encoder.embed([cxr.path, "/nonexistent/x.dcm"])


def test_patch_features_pool_to_the_embedding(run, encoder):
    _, _, records = run
    for rec in (records[0], records[3]):
        fmap = encoder.patch_features(rec.path, spacing=rec.spacing)
        assert fmap.ndim == (3 if rec.modality == "cxr" else 4) and fmap.shape[-1] == 192
        if rec.modality == "ct":
            assert fmap.shape[0] > 1
        pooled = fmap.reshape(-1, 192).mean(0)
        np.testing.assert_allclose(
            pooled, encoder.embed(rec.path, spacing=rec.spacing)[0], atol=1e-5, rtol=0
        )


def test_step_and_checkpoint_folder(run):
    workdir, _, records = run
    paths = [records[0].path, records[3].path]
    by_step = mmv_jax.load_encoder(workdir, step=3)
    by_folder = mmv_jax.load_encoder(os.path.join(workdir, "checkpoints", "3"))
    assert by_step.step == by_folder.step == 3
    a, b = by_step.embed(paths), by_folder.embed(paths)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - mmv_jax.load_encoder(workdir).embed(paths)).max() > 1e-3  # step 7 differs
    # only the params are read (the optimizer state stays on disk)
    args = export._params_only(os.path.join(workdir, "checkpoints", "7", "state"))
    assert args.partial_restore and set(args.item) == {"params"}
    with pytest.raises(export.ConversionError, match="no step 5"):
        mmv_jax.load_encoder(workdir, step=5)
    with pytest.raises(FileNotFoundError, match="nope"):
        mmv_jax.load_encoder(os.path.join(workdir, "nope"))


def test_corrupted_checkpoint_is_refused(run, tmp_path):
    """A flipped bit in the saved params fails the trainer's checksums: refused by step."""
    import shutil

    workdir, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    saved = json.loads((copy / "checkpoints" / "3" / "checksums" / "metadata").read_text())
    key = next(k for k in saved if k.endswith("['norm']['scale'].value"))
    saved[key] ^= 1  # as if the array had changed on disk
    (copy / "checkpoints" / "3" / "checksums" / "metadata").write_text(json.dumps(saved))
    with pytest.raises(export.ConversionError, match=r"step 3 is corrupted: 1 arrays .*norm"):
        mmv_jax.load_encoder(str(copy), step=3)
    mmv_jax.load_encoder(str(copy))  # step 7 is intact


def test_export_round_trips_jax_and_torch(run, encoder, tmp_path, capsys):
    workdir, _, records = run
    out = str(tmp_path / "export")
    assert export.main(["--checkpoint", workdir, "--out", out]) == 0
    assert "step 7" in capsys.readouterr().out
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["model"]["variant"] == "Ti/14" and conf["model"]["depth"] == 2
    assert conf["model"]["patch_size"] == 14 and conf["model"]["rope"] == {
        "alpha": 128.0,
        "base": 10000.0,
        "pairs_per_axis": 10,
    }
    p = conf["preprocessing"]
    assert (p["long_side_2d"], p["long_side_3d"]) == (112, 70)
    assert p["ct_window"] == {"width": 2500.0, "level": 250.0}
    assert conf["step"] == 7 and "min-max" in p["intensity"]["cxr"]
    assert "load_encoder" in open(os.path.join(out, "README.md")).read()
    from safetensors.numpy import load_file

    names = set(load_file(os.path.join(out, "model.safetensors")))
    assert "blocks.1.attn.qkv.weight" in names and not any(n.startswith("projector") for n in names)

    cxr, ct = records[0], records[3]
    inputs = [cxr.path, ct.path]
    spacing = [cxr.spacing, None]
    want = encoder.embed(inputs, spacing=spacing)
    jx = mmv_jax.load_encoder(out)
    np.testing.assert_allclose(jx.embed(inputs, spacing=spacing), want, atol=1e-5, rtol=0)

    torch = pytest.importorskip("torch")
    from mmv_jax.torch import load_encoder as load_torch

    tenc = load_torch(out)
    a, b = load_image(cxr.path, spacing=cxr.spacing), load_image(ct.path)
    zt = tenc.embed(
        [torch.from_numpy(a.array[0]), torch.from_numpy(b.array)],
        spacing=[a.spacing[1:], b.spacing],
    )
    assert isinstance(zt, torch.Tensor) and zt.shape == (2, 192)
    np.testing.assert_allclose(zt.numpy(), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(tenc.embed(inputs, spacing=spacing).numpy(), want, atol=1e-4, rtol=0)
    ft = tenc.patch_features(ct.path).numpy()
    np.testing.assert_allclose(ft, encoder.patch_features(ct.path), atol=1e-4, rtol=0)


_REFUSALS = {
    "missing": "no such folder",
    "not_empty": "not empty",
    "bad_step": "no step 5",
    "no_config": "no config.json",
}


def _refusal_args(workdir, tmp_path, case):
    out = tmp_path / "out"
    args = ["--checkpoint", workdir, "--out", str(out)]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
    elif case == "not_empty":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "bad_step":
        args += ["--step", "5"]
    else:
        bare = tmp_path / "bare"
        bare.mkdir()
        args[1] = str(bare)
    return args


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_export_refusals_are_one_line(run, tmp_path, capsys, case):
    args = _refusal_args(run[0], tmp_path, case)
    capsys.readouterr()
    assert export.main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not _NATIVE_LOG.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("mmv-export: ") and _REFUSALS[case] in lines[0]


def test_export_cli_exit_code(run, tmp_path):
    """The command line itself once: exit code 2 and one line, no traceback."""
    args = _refusal_args(run[0], tmp_path, "bad_step")
    r = subprocess.run(
        [sys.executable, "-m", "mmv_jax.export", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _ROOT, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 2, r.stderr
    # XLA's native start-up lines (this machine's JAX build looks for CUDA) are not ours
    lines = [ln for ln in r.stderr.strip().splitlines() if not _NATIVE_LOG.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("mmv-export: ") and "Traceback" not in r.stderr
    assert _REFUSALS["bad_step"] in lines[0]


def test_import_is_light():
    code = (
        "import sys, mmv_jax, mmv_jax.export, mmv_jax.images, mmv_jax.torch.names, mmv_jax.torch;"
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]; assert not bad, bad"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _ROOT},
    )
    assert r.returncode == 0, r.stderr


def test_export_that_does_not_match_its_config_is_refused(run, tmp_path):
    workdir, _, _ = run
    out = tmp_path / "export"
    assert export.main(["--checkpoint", workdir, "--step", "3", "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    conf["model"]["depth"] = 3  # the weights hold 2 blocks
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(export.ExportError, match="blocks.2.attn.qkv.weight"):
        mmv_jax.load_encoder(str(out))
    pytest.importorskip("torch")
    from mmv_jax.torch import load_encoder as load_torch

    with pytest.raises(export.ExportError, match="does not match config.json"):
        load_torch(str(out))
    conf["format_version"] = 99
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(export.ExportError, match="upgrade mmv_jax"):
        load_torch(str(out))
