"""Your own data with a sixth finding: a folder of DICOMs + a labels CSV goes through
tools/build_manifest.py folder, mmv-manifest, training with evaluation during training,
mmv-embed (a step folder) and mmv-probe; the finding is carried by name all the way."""

import json
import os

import numpy as np
import pytest
from helpers import load_build_manifest, tiny_config, write_csv

from mmv_jax.data import pipeline, synthetic
from mmv_jax.data.manifest import ManifestError, load_manifest, write_manifest
from mmv_jax.data.manifest_cli import main as manifest_main
from mmv_jax.eval import embed as emb, probe
from mmv_jax.eval.io import load_embeddings

N = 24


def _hospital_folder(root):
    """N X-ray DICOMs in per-patient folders (two images for some patients) and a CSV whose
    pneumothorax and cardiomegaly columns follow the images' drawn findings."""
    rows = []
    for i in range(N):
        rng = np.random.default_rng([7, i])
        labels = {"cardiomegaly": int(i % 2), "pleural_effusion": int(i % 3 == 0)}
        mu = synthetic.cxr_phantom(rng, 120, 100, {**dict.fromkeys(synthetic.LABELS, 0), **labels})
        patient = f"MRN{1000 + i // 2}"  # identifier-like: must never reach the manifest
        rel = f"pt{i // 2}/img{i:02d}.dcm"
        os.makedirs(root / "images" / f"pt{i // 2}", exist_ok=True)
        synthetic.write_cxr_dicom(
            str(root / "images" / rel), mu, index=i, spacing=3.0, monochrome1=False, patient=f"p{i}"
        )
        # pneumothorax follows effusion here (the phantom draws no pneumothorax of its own)
        rows.append(
            [
                f"img{i:02d}",
                patient,
                labels["pleural_effusion"],
                labels["cardiomegaly"],
                "" if i == 5 else labels["pleural_effusion"],
            ]
        )
    write_csv(
        root / "labels.csv", ["image", "patient", "Pneumothorax", "Cardiomegaly", "Effusion"], rows
    )


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    _hospital_folder(root)
    bm = load_build_manifest()
    out = root / "mine.jsonl"
    bm.main(
        [
            "folder",
            "--images",
            str(root / "images"),
            "--labels",
            str(root / "labels.csv"),
            "--id-col",
            "image",
            "--patient-col",
            "patient",
            "--label-cols",
            "Pneumothorax",
            "Cardiomegaly",
            "Effusion=pleural_effusion",
            "--out",
            str(out),
            "--val",
            "0.25",
            "--test",
            "0.25",
            "--seed",
            "3",
        ]
    )
    return root, out


def test_folder_manifest_declares_the_findings_and_splits_by_patient(own, capsys):
    root, out = own
    text = out.read_text()
    assert "MRN" not in text  # patients are numbers, not their ids
    recs = load_manifest(out)
    assert recs.findings == ("pneumothorax", "cardiomegaly", "pleural_effusion")
    assert len(recs) == N and {r.split for r in recs} == {"train", "val", "test"}
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values()) and len(by_patient) == N // 2
    r5 = next(r for r in recs if r.id == "img05")
    assert "pleural_effusion" not in r5.labels and r5.labels["pneumothorax"] == 0
    # the same command gives the same split; a manifest without the header refuses the label
    assert manifest_main(["stats", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["findings"][0] == "pneumothorax" and s["records"] == N
    pos = sum(g["labels"]["pneumothorax"]["pos"] for g in s["groups"].values())
    assert pos == sum(r.labels.get("pneumothorax") == 1 for r in recs)
    bare = root / "bare.jsonl"
    bare.write_text("\n".join(out.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ManifestError, match=r"bare.jsonl:1: unknown label 'pneumothorax'"):
        load_manifest(bare)
    assert manifest_main(["validate", str(bare)]) == 2
    assert "unknown label" in capsys.readouterr().err


def test_sixth_finding_through_training_embedding_and_probing(own, tmp_path, capsys):
    from mmv_jax.train.loop import train_and_evaluate

    _, manifest = own
    cfg = tiny_config(
        **{
            "model.depth": 1,
            "total_steps": 2,
            "log_every_steps": 1,
            "checkpoint_every_steps": 2,
            "async_checkpointing": False,
            "eval_every_steps": 2,
            "eval.max_images": 8,
            "peak_flops_per_device": 1e12,
        }
    )
    cfg.data = pipeline.demo_config()
    cfg.data.manifest = str(manifest)
    cfg.data.cxr_per_batch, cfg.data.ct_per_batch = 4, 0
    work = tmp_path / "run"
    train_and_evaluate(cfg, str(work))
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/macro_auroc" in r]
    assert [r["step"] for r in ev] == [2]
    assert ev[0]["eval/n_train"] == 8 and ev[0]["eval/n_val"] == 6
    assert set(ev[0]) >= {"eval/auroc/pneumothorax", "eval/auroc/cardiomegaly", "eval/seconds"}
    assert 0.0 <= ev[0]["eval/macro_auroc"] <= 1.0
    kept = load_embeddings(str(work / "eval" / "step_2.npz"))
    assert kept["findings"].tolist()[0] == "pneumothorax"
    # the same command again: already finished, with its last loss and eval AUROC
    from launch.train import _train
    from mmv_jax import paths

    capsys.readouterr()
    _train(cfg, paths.resolve(str(work)))
    said = capsys.readouterr().out
    assert said.startswith("mmv-train: already finished (config.total_steps=2): step 2, loss ")
    assert "eval macro AUROC" in said and "nan" not in said

    out = str(tmp_path / "emb.npz")
    assert (
        emb.main(
            [
                "--checkpoint",
                str(work / "checkpoints" / "2"),
                "--manifest",
                str(manifest),
                "--out",
                out,
            ]
        )
        == 0
    )
    data = load_embeddings(out)
    assert data["labels"].shape == (N, 3)
    assert data["findings"].tolist() == ["pneumothorax", "cardiomegaly", "pleural_effusion"]
    assert np.isnan(data["labels"][data["ids"].tolist().index("img05"), 2])
    assert probe.main(["--embeddings", out, "--bootstrap", "10", "--out", str(tmp_path / "p")]) == 0
    res = json.load(open(tmp_path / "p" / "probe_ALL.json"))
    assert res["findings"][0] == "pneumothorax"
    assert set(res["test_sets"]["images"]["per_label"]) == {
        "pneumothorax",
        "cardiomegaly",
        "pleural_effusion",
    }
    assert "| pneumothorax | CARD | EFF |" in capsys.readouterr().out


def test_findings_header_is_checked_and_round_trips(tmp_path):
    recs = [
        dict(
            id="a",
            path="a.png",
            modality="cxr",
            dataset="d",
            split="train",
            labels={"pneumothorax": 1},
        )
    ]
    write_manifest(tmp_path / "m.jsonl", recs, findings=["pneumothorax"])
    assert load_manifest(tmp_path / "m.jsonl").findings == ("pneumothorax",)
    for header, msg in (
        ('{"findings": ["Pneumo thorax"]}', "must match"),
        ('{"findings": ["a", "a"]}', "duplicate"),
        ('{"findings": []}', "non-empty"),
        ('{"findings": ["a"], "x": 1}', "only 'findings'"),
    ):
        (tmp_path / "b.jsonl").write_text(header + "\n")
        with pytest.raises(ManifestError, match=msg):
            load_manifest(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text(
        json.dumps(dict(recs[0], labels={})) + '\n{"findings": ["a"]}\n'
    )
    with pytest.raises(ManifestError, match="c.jsonl:2: the findings header must come before"):
        load_manifest(tmp_path / "c.jsonl")
