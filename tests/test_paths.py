"""The path layer: URIs reach etils.epath untouched, file:// and relative paths become local."""

import json
import os

from etils import epath

from mmv_jax import paths
from mmv_jax.data.manifest import parse_record


def test_uris_are_never_joined_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = paths.resolve("gs://bucket/run")
    assert isinstance(p, epath.Path) and str(p) == "gs://bucket/run"
    assert str(p / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(paths.resolve("file:///data/run")) == "/data/run"
    assert str(paths.resolve("rel/run")) == os.path.join(str(tmp_path), "rel/run")
    # a manifest in a bucket: its relative record paths stay in the bucket
    rec = parse_record(
        dict(id="a", path="cxr/a.dcm", modality="cxr", dataset="d", split="train"),
        "gs://bucket/data",
        "m.jsonl:1",
    )
    assert rec.path == "gs://bucket/data/cxr/a.dcm"


def test_atomic_write_and_file_uri_manifest(tmp_path):
    from mmv_jax.data.manifest import load_manifest

    target = paths.resolve(f"file://{tmp_path}") / "m.jsonl"
    paths.write_text_atomic(
        target,
        json.dumps(dict(id="a", path="a.png", modality="cxr", dataset="d", split="train")) + "\n",
    )
    assert os.listdir(tmp_path) == ["m.jsonl"]  # no temporary file left behind
    (rec,) = load_manifest(f"file://{tmp_path}/m.jsonl")
    assert rec.path == str(tmp_path / "a.png")
