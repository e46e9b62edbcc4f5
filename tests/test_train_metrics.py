"""metrics.jsonl: rewritten whole at each row, truncated on resume, robust to a torn last line."""

import json

import pytest

from mmv_jax.train import metrics


def test_resume_truncates_and_a_torn_last_line_is_dropped(tmp_path, caplog):
    w = metrics.MetricWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-write (older versions appended)
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "torn last line" in caplog.text
    w = metrics.MetricWriter(tmp_path, start=2)  # resumed from the step-2 checkpoint
    w.write(3, {"loss": 0.25})
    w.close()
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_bad_line_inside_the_file_names_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        metrics.read_metrics(tmp_path / "metrics.jsonl")
