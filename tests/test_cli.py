"""The command lines explain themselves: mmv-train --help / --dry_run; a bad
config is refused naming its key before any compile (in-process over many configs, and one
subprocess for the exit code); every missing-file or bad-argument case of mmv-embed, mmv-probe,
mmv-cache and mmv-manifest is one line on stderr and a non-zero exit, never a traceback."""

import os
import re
import subprocess
import sys

import pytest
from helpers import tiny_config

from mmv_jax.data import cache, manifest_cli, pipeline, synthetic
from mmv_jax.errors import ConfigError
from mmv_jax.eval import embed, probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")


def _stderr_lines(text):
    return [line for line in text.splitlines() if line.strip() and not _NATIVE_LOG.match(line)]


def _train(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return synthetic.make_demo_dataset(str(tmp_path_factory.mktemp("cli") / "d"), n_cxr=6, n_ct=2)


def _cfg(manifest, **overrides):
    cfg = tiny_config(**{"model.depth": 1})
    cfg.data = pipeline.demo_config()
    cfg.data.manifest = manifest
    cfg.data.cxr_per_batch, cfg.data.ct_per_batch = 2, 1
    for key, value in overrides.items():
        node, *path = [cfg, *key.split(".")]
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return cfg


def test_the_demo_config_passes_the_checks(demo):
    from launch.train import check_config

    check_config(_cfg(demo))


@pytest.mark.parametrize(
    "key,overrides",
    [
        ("optim.lr", {"optim.lr": -1.0}),
        ("total_steps", {"total_steps": 0}),
        ("model.variant", {"model.variant": "H/14"}),
        ("config.init_from", {"init_from": "/no/such/run"}),
        ("model.dtype", {"model.dtype": "int8"}),
        ("loss.num_slices", {"loss.num_slices": 0}),
        ("eval_every_steps", {"eval_every_steps": -5}),
        ("eval.max_images", {"eval_every_steps": 5, "eval.max_images": 0}),
        ("eval.probe_c", {"eval_every_steps": 5, "eval.probe_c": 0.0}),
        ("data.eval_split", {"eval_every_steps": 5, "data.eval_split": "train"}),
        ("data.manifest", {"data.manifest": "/no/such.jsonl"}),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(demo, key, overrides):
    from launch.train import check_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        check_config(_cfg(demo, **overrides))


def test_a_mesh_that_does_not_fit_is_refused_naming_the_key():
    from mmv_jax.train import sharding as shd

    with pytest.raises(ConfigError, match=re.escape("config.mesh.shape")):
        shd.make_mesh((3, 1, 1))


def test_a_bad_config_exits_with_one_line(tmp_path):
    """The one launch in a subprocess: the exit code and stderr of the real command line."""
    work = tmp_path / "never"
    r = _train("--config", "configs/demo.py", "--workdir", str(work), "--config.optim.lr=-1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert _stderr_lines(r.stderr) == [
        "mmv-train: config.optim.lr must be a positive finite number, got -1.0"
    ]
    assert not work.exists()


def test_help_describes_mmv_train(monkeypatch, capsys):
    """absl's own --help would describe the console-script wrapper; main() prints this module's."""
    import launch.train

    monkeypatch.setattr(sys, "argv", ["mmv-train", "--help"])
    with pytest.raises(SystemExit) as e:
        launch.train.main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and "mmv-train --config configs/X.py --workdir DIR" in out
    assert "--dry_run" in out and "--print_config" in out and "Run commands" in out


@pytest.mark.slow  # a compile: 10-40 s on 2 cores
def test_dry_run_compiles_one_step_and_writes_nothing(demo, tmp_path):
    from launch.train import dry_run

    before = set(os.listdir(os.path.dirname(demo)))
    out = dry_run(_cfg(demo))
    assert out["platform"] == "cpu" and out["bytes_per_device"] > 0 and out["seq_len"] == 256
    assert set(os.listdir(os.path.dirname(demo))) == before


def _one_line(capsys, code, prefix):
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = _stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_bad_arguments_are_one_line(demo, tmp_path, capsys):
    def code_of(fn, argv):
        try:
            return fn(argv)
        except SystemExit as e:
            return e.code

    nope = str(tmp_path / "nope.jsonl")
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.json").write_text(_cfg(demo).to_json())
    emb = ["--manifest", demo, "--out", str(tmp_path / "e.npz")]
    cases = [
        (cache.main, ["--manifest", nope, "--out", str(tmp_path / "c")], "mmv-cache: "),
        (
            cache.main,
            ["--manifest", demo, "--out", str(tmp_path / "c"), "--workers", "0"],
            "mmv-cache: error: --workers",
        ),
        (
            probe.main,
            ["--embeddings", "x.npz", "--stage", "7"],
            "mmv-probe: error: argument --stage",
        ),
        (
            probe.main,
            ["--embeddings", str(tmp_path / "x.npz")],
            "mmv-probe: error: embedding file not found",
        ),
        (embed.main, ["--checkpoint", str(tmp_path / "none"), *emb], "mmv-embed: --checkpoint"),
        (
            embed.main,
            ["--checkpoint", str(run / "checkpoints" / "4"), "--step", "5", *emb],
            "mmv-embed: --checkpoint",
        ),
        (
            embed.main,
            ["--checkpoint", str(run / "checkpoints" / "4"), *emb],
            "mmv-embed: --checkpoint",
        ),
        (
            embed.main,
            ["--checkpoint", str(run), "--manifest", nope, "--out", "x.npz"],
            "mmv-embed: ",
        ),
        (embed.main, ["--checkpoint", str(run), *emb, "--splits", "nosuch"], "mmv-embed: "),
        (embed.main, ["--checkpoint", str(run), *emb, "--batch-size", "0"], "mmv-embed: error"),
        (manifest_main := manifest_cli.main, ["stats", nope], "mmv-manifest: "),
        (manifest_main, ["frobnicate", demo], "mmv-manifest: error: argument command"),
    ]
    for fn, argv, prefix in cases:
        line = _one_line(capsys, code_of(fn, argv), prefix)
        assert "nope.jsonl" in line or "nope" not in " ".join(argv), line
    assert manifest_main(["validate", demo]) == 0
    assert "8 records, valid" in capsys.readouterr().out
