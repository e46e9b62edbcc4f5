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

COMMON = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2")


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def _steps(work):
    return sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, demo_manifest):
    work = tmp_path_factory.mktemp("lost") / "healthy"
    r = _run(train_cmd(work, demo_manifest, "--config.total_steps=6", *COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(work) == [4, 6]
    return work


def test_divergence_keeps_the_healthy_checkpoints(healthy, demo_manifest, tmp_path):
    work = tmp_path / "div"
    shutil.copytree(healthy, work)
    # lr 1e30: the first update blows the parameters up, every later step is non-finite; with
    # checkpoints every 2 steps and 2 kept, the streak of 4 would have rotated out both
    r = _run(train_cmd(work, demo_manifest, "--config.total_steps=30", *COMMON,
                       "--config.optim.lr=1e30", "--config.allow_config_change=True",
                       "--config.max_nonfinite_steps=4"))
    assert r.returncode != 0 and "consecutive non-finite steps" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _steps(work) == [4, 6]
    # a rerun with a sane learning rate resumes from the last healthy state and stays finite
    r = _run(train_cmd(work, demo_manifest, "--config.total_steps=8", *COMMON,
                       "--config.allow_config_change=True"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 6" in r.stderr
    rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
    assert [x["step"] for x in rows] == list(range(1, 9))
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
    r = _run(train_cmd(work, demo_manifest, "--config.total_steps=8", *COMMON,
                       "--config.keep_checkpoints=4"))  # 4, 6, 8 kept
    assert r.returncode == 0, r.stderr[-3000:]
    _flip_a_bit(work / "checkpoints" / "8" / "state")
    os.remove(work / "checkpoints" / "6" / "state" / "_METADATA")
    r = _run(train_cmd(work, demo_manifest, "--config.total_steps=10", *COMMON,
                       "--config.keep_checkpoints=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {work / 'checkpoints' / '8'}" in r.stderr
    assert f"checkpoint {work / 'checkpoints' / '6'}" in r.stderr
    assert "at step 4" in r.stderr
    names = set(os.listdir(work / "checkpoints"))
    assert {"6.corrupt", "8.corrupt"} <= names and {"6", "8", "10"} <= names


def test_a_second_trainer_on_a_busy_workdir_is_refused(healthy, demo_manifest, tmp_path):
    work = tmp_path / "busy"
    first = subprocess.Popen(train_cmd(work, demo_manifest, "--config.total_steps=1000"),
                             cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
