"""The loop feeds the devices ahead: data waits overlap the step, nothing comes back from the
devices between log steps, and the metrics rows tell the wall-clock truth."""

import time

import numpy as np
import pytest
from helpers import tiny_config

from mmv_jax.data import pipeline
from mmv_jax.data.synthetic import make_demo_dataset
from mmv_jax.train import loop


class _FixedIterator:
    """One real batch, served ``sleep_s`` late each time (a data pipeline of known cost)."""

    def __init__(self, batch, stats, sleep_s, on_next=None):
        self.batch, self.stats, self.sleep_s, self.on_next = batch, stats, sleep_s, on_next
        self.step = 0

    def __next__(self):
        time.sleep(self.sleep_s)
        if self.on_next:
            self.on_next()
        self.step += 1
        return self.batch, dict(self.stats, step=np.int64(self.step))

    def get_state(self):
        return {"step": self.step, "bad_files": 0, "tried": 0}

    def set_state(self, state):
        self.step = int(state["step"])

    def close(self):
        pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root), n_cxr=12, n_ct=4, seed=0)
    return str(root / "manifest.jsonl")


def _cfg(manifest, **kw):
    c = tiny_config(
        **{
            "model.depth": 1,
            "total_steps": 9,
            "log_every_steps": 4,
            "checkpoint_every_steps": 100,
            "async_checkpointing": False,
            "data.manifest": manifest,
            "data.cxr_per_batch": 4,
            "data.ct_per_batch": 2,
            "data.patch_dtype": "float32",
            "data.worker_count": 0,
            "data.buckets.seq_len": 256,
            "data.buckets.slots": 64,
            "data.views.long_side_2d": 112,
            "data.views.long_side_3d": 70,
            "data.buckets.rows_2d": (4,),
            "data.buckets.rows_3d": (4,),
            **kw,
        }
    )
    return c


def _run(monkeypatch, cfg, workdir, sleep_s, on_next=None):
    real = pipeline.make_train_iterator(cfg.data, seed=0)
    batch, stats = next(real)
    real.close()
    monkeypatch.setattr(
        pipeline,
        "make_train_iterator",
        lambda *a, **k: _FixedIterator(batch, stats, sleep_s, on_next),
    )
    loop.train_and_evaluate(cfg, str(workdir))
    from mmv_jax.train.metrics import read_metrics

    return read_metrics(workdir / "metrics.jsonl")


def test_overlap_honest_metrics_and_no_sync_between_logs(demo, tmp_path, monkeypatch):
    fast = _run(monkeypatch, _cfg(demo), tmp_path / "fast", 0.0)
    # the metrics rows agree with each other (wall clock, data waits included)
    assert "compile_s" in fast[0] and fast[0]["compile_s"] > 0 and "compile_s" not in fast[1]
    for r in fast:
        assert r["tokens_per_s"] == pytest.approx(r["window_tokens"] / r["window_s"])
        assert r["step_s"] == pytest.approx(r["window_s"] / r["window_steps"])
        assert 0 <= r["data_wait_s"] <= r["window_s"]
        assert 0 < r["mfu"] < 1
        assert r["window_tokens"] == r["window_steps"] * int(
            fast[0]["window_tokens"] / fast[0]["window_steps"]
        )
    assert fast[1]["time"] > fast[0]["time"] and fast[1]["window_steps"] == 4
    step_s = fast[1]["step_s"]  # the step alone: this iterator costs nothing

    # data as slow as the step: overlapped, a step takes about max(data, step), not the sum
    slow = _run(monkeypatch, _cfg(demo), tmp_path / "slow", step_s)
    assert slow[1]["step_s"] < 1.5 * step_s, (slow[1]["step_s"], step_s)
    assert slow[1]["data_wait_s"] > 0.5 * slow[1]["window_s"]


def test_no_device_read_between_log_steps(demo, tmp_path, monkeypatch):
    """Counts every read of a device array's value (``_value`` and ``__array__``: how
    ``int()``, ``float()``, ``np.asarray`` and ``device_get`` fetch) and when it happened, in
    batches drawn. With one log and one checkpoint at the last step, every read must come after
    the whole run's data has been drawn. (The loop also runs those steps under JAX's
    device-to-host transfer guard, which fires on GPU and TPU; on CPU it never does.)"""
    from jax._src import array

    reads, it = [], []
    value, as_array = array.ArrayImpl._value, array.ArrayImpl.__array__

    def record():
        reads.append(it[0].get_state()["step"] if it else -1)

    def counted_value(self):
        record()
        return value.fget(self)

    def counted_array(self, *a, **k):
        record()
        return as_array(self, *a, **k)

    real = pipeline.make_train_iterator
    monkeypatch.setattr(
        pipeline, "make_train_iterator", lambda *a, **k: it.append(real(*a, **k)) or it[-1]
    )
    cfg = _cfg(demo, total_steps=12, log_every_steps=100)
    monkeypatch.setattr(array.ArrayImpl, "_value", property(counted_value))
    monkeypatch.setattr(array.ArrayImpl, "__array__", counted_array)
    loop.train_and_evaluate(cfg, str(tmp_path / "w"))
    during = [r for r in reads if 0 <= r < 12]
    assert not during, f"device reads while steps 1-11 ran (batches drawn: {during})"
    assert reads, "the instrumentation saw nothing: the test would pass vacuously"
