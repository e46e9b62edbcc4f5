"""The run folder's records: a resume that changes the math is refused, naming the keys."""

import json

import pytest
from helpers import tiny_config

from mmv_jax.train import workdir as wd


def test_changed_math_is_refused_naming_the_keys(tmp_path):
    cfg = tiny_config()
    wd.check_and_record_config(cfg, tmp_path, resuming=False)
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == cfg.optim.lr

    changed = tiny_config(**{"optim.lr": 3e-4, "data.cxr_per_batch": 128})
    with pytest.raises(
        ValueError, match=r"optim\.lr.*data\.cxr_per_batch|data\.cxr_per_batch.*optim\.lr"
    ):
        wd.check_and_record_config(changed, tmp_path, resuming=True)
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == cfg.optim.lr  # kept

    # the schedule of logs/checkpoints, the length and the topology may change
    fine = tiny_config(
        **{
            "total_steps": 50,
            "log_every_steps": 7,
            "mesh.shape": (2, 2, 1),
            "model.remat_policy": "nothing_saveable",
            "data.worker_count": 4,
        }
    )
    wd.check_and_record_config(fine, tmp_path, resuming=True)
    assert json.load(open(tmp_path / "config.json"))["total_steps"] == 50

    changed.allow_config_change = True
    wd.check_and_record_config(changed, tmp_path, resuming=True)
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 3e-4


def test_run_info_names_topology_versions_and_command(tmp_path):
    wd.record_start(tmp_path, 0, "cpu")
    wd.record_start(tmp_path, 5, "cpu")
    starts = json.load(open(tmp_path / "run_info.json"))["starts"]
    assert [s["start_step"] for s in starts] == [0, 5]
    s = starts[-1]
    assert s["process_count"] == 1 and s["devices"][0]["count"] == s["device_count"] >= 1
    assert s["versions"]["jax"] and s["versions"]["orbax-checkpoint"] and s["argv"]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock.json").write_text(
            json.dumps(dict(host=wd.socket.gethostname(), pid=live.pid, started=0, refreshed=0))
        )
        with pytest.raises(wd.WorkdirBusy, match=f"pid {live.pid}"):
            wd.Lock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    lock = wd.Lock(tmp_path)
    lock.acquire()  # the holder is gone now
    assert "stale lock" in caplog.text
    assert json.load(open(tmp_path / "lock.json"))["pid"] == wd.os.getpid()
    lock.release()
    assert not (tmp_path / "lock.json").exists()
    # another host's lock: stale only once it has not been refreshed for stale_s
    (tmp_path / "lock.json").write_text(
        json.dumps(dict(host="elsewhere", pid=1, started=0, refreshed=wd.time.time()))
    )
    with pytest.raises(wd.WorkdirBusy):
        wd.Lock(tmp_path, stale_s=600).acquire()
    wd.Lock(tmp_path, stale_s=0).acquire()
