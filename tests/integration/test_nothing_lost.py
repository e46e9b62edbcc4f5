"""Nothing lost: a diverging run never replaces healthy checkpoints, a damaged checkpoint falls
back to the newest intact one, and a second trainer on a busy run folder is refused."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import ROOT, env, train_cmd
from helpers import MRN, put_raw_tag

COMMON = (
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=2",
)


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def _steps(work):
    return sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())


def _with_identifier_files(demo_manifest, out):
    """The demo data plus train CT files whose parsed tags hold identifier text."""
    import pydicom
    from pydicom.data import get_testdata_file

    shutil.copytree(os.path.dirname(demo_manifest), out)
    lines = open(out / "manifest.jsonl").read().splitlines()
    for i, tag in enumerate(("RescaleSlope", "PixelSpacing", "SliceThickness")):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        put_raw_tag(ds, tag, MRN)
        ds.save_as(out / f"ident{i}.dcm")
        lines.append(
            json.dumps(
                dict(
                    id=f"ident{i}",
                    path=f"ident{i}.dcm",
                    modality="ct",
                    dataset="demo",
                    split="train",
                )
            )
        )
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return str(out / "manifest.jsonl")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, demo_manifest):
    """6 healthy steps on data with identifier text in parsed tags of three train files: the
    run skips them and no identifier reaches its log or any file of the run folder."""
    root = tmp_path_factory.mktemp("lost")
    manifest = _with_identifier_files(demo_manifest, root / "data")
    work = root / "healthy"
    r = _run(
        train_cmd(
            work,
            manifest,
            "--config.total_steps=12",
            *COMMON,
            "--config.checkpoint_every_steps=4",
            "--config.keep_checkpoints=3",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping bad file" in r.stderr and "ident" in r.stderr
    assert MRN not in r.stderr + r.stdout
    for d, _, files in os.walk(work):
        for f in files:
            assert MRN.encode() not in open(os.path.join(d, f), "rb").read(), f
    rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
    assert rows[-1]["bad_files"] >= 1
    assert _steps(work) == [4, 8, 12]
    return work


def test_divergence_keeps_the_healthy_checkpoints(healthy, demo_manifest, tmp_path):
    work = tmp_path / "div"
    shutil.copytree(healthy, work)
    # lr 1e30: the first update blows the parameters up, every later step is non-finite; with
    # checkpoints every 2 steps and 2 kept, the streak of 4 would have rotated out both
    r = _run(
        train_cmd(
            work,
            demo_manifest,
            "--config.total_steps=30",
            *COMMON,
            "--config.optim.lr=1e30",
            "--config.allow_config_change=True",
            "--config.max_nonfinite_steps=4",
        )
    )
    assert r.returncode != 0 and "consecutive non-finite steps" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _steps(work) == [4, 8, 12]
    # a rerun with a sane learning rate resumes from the last healthy state and stays finite
    # (the run folder given as a file:// URI: the path layer that also serves gs:// folders)
    r = _run(
        train_cmd(
            f"file://{work}",
            demo_manifest,
            "--config.total_steps=14",
            *COMMON,
            "--config.allow_config_change=True",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 12" in r.stderr
    assert not os.path.exists(os.path.join(ROOT, "file:"))  # never joined to the cwd
    rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
    assert [x["step"] for x in rows] == list(range(1, 15))
    assert all(map(lambda x: x == x and abs(x) < 1e6, (x["loss"] for x in rows)))


def _flip_a_bit(folder):
    """Flips one bit in the middle of the largest data file of an Orbax state folder."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(target, "wb").write(bytes(data))


def test_damaged_checkpoints_fall_back_to_the_newest_intact(healthy, demo_manifest, tmp_path):
    work = tmp_path / "bad"
    shutil.copytree(healthy, work)
    _flip_a_bit(work / "checkpoints" / "12" / "state")
    os.remove(work / "checkpoints" / "8" / "state" / "_METADATA")
    r = _run(
        train_cmd(
            work, demo_manifest, "--config.total_steps=14", *COMMON, "--config.keep_checkpoints=4"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {work / 'checkpoints' / '12'}" in r.stderr
    assert f"checkpoint {work / 'checkpoints' / '8'}" in r.stderr
    assert "at step 4" in r.stderr
    names = set(os.listdir(work / "checkpoints"))
    assert {"8.corrupt", "12.corrupt"} <= names and {"8", "12", "14"} <= names


def test_a_second_trainer_on_a_busy_workdir_is_refused(healthy, demo_manifest, tmp_path):
    work = tmp_path / "busy"
    first = subprocess.Popen(
        train_cmd(work, demo_manifest, "--config.total_steps=1000"),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t = time.time()
        while not (work / "lock.json").exists():
            assert time.time() - t < 120 and first.poll() is None
            time.sleep(0.2)
        t = time.time()
        r = _run(train_cmd(work, demo_manifest, "--config.total_steps=3"))
        assert r.returncode != 0 and time.time() - t < 60
        assert "in use by another trainer" in r.stderr and f"pid {first.pid}" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
