"""Pipeline on the synthetic demo data: mixing, exact save/restore, bad files, eval, cache."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from helpers import join_groups, same_batch

from mmv_jax.data import pipeline as P
from mmv_jax.data.manifest import LABELS, load_manifest
from mmv_jax.data.synthetic import make_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(str(out), n_cxr=24, n_ct=10, seed=1)


def _cfg(manifest, **kw):
    cfg = P.demo_config()
    cfg.manifest = manifest
    cfg.cxr_per_batch, cfg.ct_per_batch = 4, 2
    for k, v in kw.items():
        cfg[k] = v
    return cfg


_same = same_batch


def test_demo_dataset(demo):
    recs = load_manifest(demo)
    assert {r.modality for r in recs} == {"cxr", "ct"} and len(recs) == 34
    assert {r.split for r in recs} >= {"train", "val"}
    assert all(set(r.labels) == set(LABELS) for r in recs)
    pos = np.mean([[r.labels[k] for k in LABELS] for r in recs], 0)
    assert (pos > 0.1).all() and (pos < 0.9).all()
    photometric = {
        pydicom.dcmread(r.path, stop_before_pixels=True).PhotometricInterpretation
        for r in recs
        if r.modality == "cxr"
    }
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    ds = pydicom.dcmread(recs[0].path, stop_before_pixels=True)
    assert ds.PatientName == "DEMO^PHANTOM" and float(ds.PixelSpacing[0]) > 0


def test_mixing_ratio_shapes_and_stats(demo):
    cfg = _cfg(demo)
    shapes = set(P.bucket_shapes(cfg))
    assert len(shapes) <= 4
    it = P.make_train_iterator(cfg, seed=0)
    nv = P.num_views_per_sample(cfg)
    assert P.num_samples_global(cfg) == 6 and nv == 10
    for _ in range(4):
        groups, s = next(it)
        assert (
            tuple(
                (g.patches.shape[0], g.patches.shape[1], g.view_sample.shape[1], g.patches.shape[2])
                for g in groups
            )
            in shapes
        )
        # the 2D group holds the X-ray views only, P*P wide; the 3D group the CT views
        assert [g.patches.shape[2] for g in groups] == [14 * 14, 14**3]
        assert [set(np.unique(g.view_modality[g.view_sample >= 0])) for g in groups] == [{0}, {1}]
        b = join_groups(groups)
        vs, vm = b.view_sample, b.view_modality
        used = vs >= 0
        samples = np.unique(vs[used])
        assert list(samples) == list(range(6))
        for smp in samples:  # every sample has all its views, one modality
            assert (vs == smp).sum() == nv
            assert len(np.unique(vm[vs == smp])) == 1
        assert (
            len(np.unique(vs[used & (vm == 0)])) == 4 and len(np.unique(vs[used & (vm == 1)])) == 2
        )
        assert ((b.view_is_global & used).sum()) == 6 * 2
        assert 0 < float(s["packing_efficiency"]) <= 1 and int(s["bad_files"]) == 0
        assert int(s["real_tokens"]) == int((b.segment_ids > 0).sum())


def test_sharding_gives_global_indices_and_partitions_stream(demo):
    cfg = _cfg(demo)
    full = join_groups(next(P.make_train_iterator(cfg, seed=3))[0])
    parts = [
        join_groups(next(P.make_train_iterator(cfg, seed=3, process_index=p, process_count=2))[0])
        for p in range(2)
    ]
    for p, b in enumerate(parts):
        got = np.unique(b.view_sample[b.view_sample >= 0])
        assert list(got) == list(range(3 * p, 3 * p + 3))
    # views depend only on the global stream position: the same tokens overall
    tot = sorted(np.round(full.patches[full.segment_ids > 0].sum(-1), 3).tolist())
    tot2 = sorted(
        np.round(np.concatenate([b.patches[b.segment_ids > 0].sum(-1) for b in parts]), 3).tolist()
    )
    assert tot == tot2


def test_save_restore_exact(demo):
    cfg = _cfg(demo)
    ref = P.make_train_iterator(cfg, seed=5)
    ref_batches = [next(ref)[0] for _ in range(5)]
    it = P.make_train_iterator(cfg, seed=5)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must be JSON-serialisable
    fresh = P.make_train_iterator(cfg, seed=5)
    fresh.set_state(state)
    for k in range(2, 5):
        assert _same(next(fresh)[0], ref_batches[k])
    other = P.make_train_iterator(cfg, seed=6)
    assert not _same(next(other)[0], ref_batches[0])


_BLAS_THREADS = r"""
import sys
from threadpoolctl import threadpool_info
from mmv_jax.data import pipeline as P
blas = lambda: sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
before = blas()
cfg = P.demo_config()
cfg.manifest, cfg.cxr_per_batch, cfg.ct_per_batch = sys.argv[1], 4, 2
next(P.make_train_iterator(cfg, seed=0))
print(before, blas())
"""


def test_batches_build_with_one_blas_thread(demo):
    pytest.importorskip("threadpoolctl")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", _BLAS_THREADS, demo],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    before, after = r.stdout.strip().splitlines()[-1].split("] [")
    if before == "[]":
        pytest.skip("numpy loaded no BLAS that threadpoolctl can see")
    assert (before, after) == ("[2", "1]")


def test_worker_processes_match_and_restore(demo):
    cfg = _cfg(demo, worker_count=2)
    it = P.make_train_iterator(cfg, seed=5)
    try:
        got = [next(it)[0] for _ in range(3)]
        state = it.get_state()
        nxt = next(it)[0]
    finally:
        it.close()
    ref = P.make_train_iterator(_cfg(demo), seed=5)
    ref_batches = [next(ref)[0] for _ in range(4)]
    for a, b in zip(got + [nxt], ref_batches):
        assert _same(a, b)
    assert state["step"] == 3
    # the state restores across worker counts: into an in-process iterator ...
    it2 = P.make_train_iterator(_cfg(demo), seed=5)
    it2.set_state(state)
    assert _same(next(it2)[0], ref_batches[3])
    # ... and an in-process state into a multi-worker iterator
    it3 = P.make_train_iterator(cfg, seed=5)
    try:
        it3.set_state({**state, "step": 1})
        assert _same(next(it3)[0], ref_batches[1])
    finally:
        it3.close()


_RESTORE = r"""
import hashlib, sys
import numpy as np
import grain, orbax.checkpoint as ocp
from mmv_jax.data import pipeline as P
cfg = P.demo_config(); cfg.manifest = sys.argv[1]; cfg.cxr_per_batch, cfg.ct_per_batch = 4, 2
it = P.make_train_iterator(cfg, seed=5)
mgr = ocp.CheckpointManager(sys.argv[2], item_names=("data",))
mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
b, s = next(it)
print("HASH", hashlib.sha1(b"".join(np.ascontiguousarray(x).tobytes() for g in b for x in g)).hexdigest(), int(s["step"]))
"""


def test_orbax_checkpoint_restore_in_new_process(demo, tmp_path):
    import hashlib

    import grain
    import orbax.checkpoint as ocp

    cfg = _cfg(demo)
    it = P.make_train_iterator(cfg, seed=5)
    next(it), next(it)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    b, _ = next(it)
    want = hashlib.sha1(
        b"".join(np.ascontiguousarray(x).tobytes() for g in b for x in g)
    ).hexdigest()
    out = subprocess.run(
        [sys.executable, "-c", _RESTORE, demo, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("HASH")][0]
    assert line.split()[1:] == [want, "2"]


def test_bad_files_skipped_counted_and_limit(demo, tmp_path, caplog):
    recs = [json.loads(l) for l in open(demo)]
    root = os.path.dirname(demo)
    train_cxr = [r for r in recs if r["split"] == "train" and r["modality"] == "cxr"]
    train_ct = [r for r in recs if r["split"] == "train" and r["modality"] == "ct"]
    shutil.copytree(root, tmp_path / "d")
    d = tmp_path / "d"
    # corrupt (truncated), missing and zero-byte files
    p0 = d / train_cxr[0]["path"]
    p0.write_bytes(p0.read_bytes()[:2000])
    os.remove(d / train_cxr[1]["path"])
    (d / train_ct[0]["path"]).write_bytes(b"")
    bad_paths = {
        str(d / train_cxr[0]["path"]),
        str(d / train_cxr[1]["path"]),
        str(d / train_ct[0]["path"]),
    }
    cfg = _cfg(str(d / "manifest.jsonl"), max_bad_fraction=0.5)
    it = P.make_train_iterator(cfg, seed=0)
    seen = 0
    for _ in range(8):
        b, s = next(it)
        b = join_groups(b)
        assert len(np.unique(b.view_sample[b.view_sample >= 0])) == 6  # still full batches
        seen = int(s["bad_files"])
    assert seen == 3  # each bad file counted once, however often it is drawn
    warned = {
        r.getMessage().split()[3].rstrip(":")
        for r in caplog.records
        if r.getMessage().startswith("skipping bad file")
    }
    assert warned == bad_paths
    assert set(it.get_state()) == {"step", "bad_files", "tried"}  # no paths, no reasons
    # a strict limit stops with one message naming the bad files
    strict = _cfg(str(d / "manifest.jsonl"), max_bad_fraction=0.0, min_files_for_bad_fraction=1)
    it = P.make_train_iterator(strict, seed=0)
    with pytest.raises(RuntimeError, match="too many bad files") as e:
        for _ in range(8):
            next(it)
    assert any(p in str(e.value) for p in bad_paths)


def test_one_bad_file_never_stops_a_long_run(demo, tmp_path):
    """1 bad file in 24: drawn again and again over many epochs, it counts once; with the
    shipped limits (1% after at least 1,000 files) the run goes on."""
    recs = [json.loads(l) for l in open(demo)]
    shutil.copytree(os.path.dirname(demo), tmp_path / "d")
    bad = next(r for r in recs if r["split"] == "train" and r["modality"] == "cxr")
    (tmp_path / "d" / bad["path"]).write_bytes(b"not an image")
    cfg = _cfg(
        str(tmp_path / "d" / "manifest.jsonl"), max_bad_fraction=P.default_config().max_bad_fraction
    )
    it = P.make_train_iterator(cfg, seed=0)
    for _ in range(60):  # 240 CXR draws over ~15 epochs of the train split
        _, s = next(it)
    assert int(s["bad_files"]) == 1 and int(it.get_state()["tried"]) >= 360


def test_eval_iterator(demo):
    cfg = _cfg(demo)
    recs = load_manifest(demo, splits="train")
    seen = []
    shapes = set()
    for b, ids in P.make_eval_iterator(cfg, demo, split="train", batch_size=8):
        shapes.add(b.patches.shape)
        used = b.view_sample >= 0
        assert sorted(b.view_sample[used].tolist()) == list(range(len(ids)))
        assert (b.view_index[used] == 0).all() and b.view_is_global[used].all()
        seen += ids
    assert seen == [r.id for r in recs] and len(shapes) == 1
    # deterministic
    b1, _ = next(P.make_eval_iterator(cfg, recs, batch_size=8))
    b2, _ = next(P.make_eval_iterator(cfg, recs, batch_size=8))
    assert _same(b1, b2)


def test_config_validation(demo):
    cfg = _cfg(demo)
    cfg.buckets.seq_len = 200
    with pytest.raises(ValueError, match="multiple of 128"):
        P.bucket_shapes(cfg)
    cfg = _cfg(demo)
    cfg.buckets.rows_2d, cfg.buckets.rows_3d = (8,), (1,)
    with pytest.raises(ValueError, match="largest bucket"):
        next(P.make_train_iterator(cfg, seed=0))
    cfg = _cfg(demo)
    cfg.rows_multiple_of = 4
    assert all(r % 4 == 0 for shape in P.bucket_shapes(cfg) for r, *_ in shape)
    cfg = _cfg(demo)
    cfg.patch_dtype = "int8"
    with pytest.raises(ValueError, match="patch_dtype"):
        P.bucket_shapes(cfg)


def test_cache_roundtrip(demo, tmp_path):
    from mmv_jax.data.cache import build_cache

    cfg = _cfg(demo)
    build = lambda: build_cache(
        demo,
        str(tmp_path / "c"),
        workers=1,
        long_side_2d=cfg.views.long_side_2d,
        long_side_3d=cfg.views.long_side_3d,
        progress=False,
    )
    res = build()
    assert res["images"] == 34 and res["bad"] == 0
    res = build()  # resumes
    assert res["images"] == 34
    recs = load_manifest(tmp_path / "c" / "manifest.jsonl")
    ct = next(r for r in recs if r.modality == "ct")
    assert ct.preprocessed and np.load(ct.path).dtype == np.int16
    assert max(ct.shape) == cfg.views.long_side_3d
    cached = _cfg("", cache_dir=str(tmp_path / "c"))
    it = P.make_train_iterator(cached, seed=0)
    b = join_groups(next(it)[0])
    assert len(np.unique(b.view_sample[b.view_sample >= 0])) == 6
    bad = _cfg("", cache_dir=str(tmp_path / "c"))
    bad.views.long_side_2d = 224
    with pytest.raises(ValueError, match="long sides"):
        P.make_train_iterator(bad, seed=0)


def test_static_facts_of_default_configs():
    for cfg in (P.default_config(), P.demo_config()):
        P.validate_config(cfg)
        t2, t3 = P.max_view_tokens(cfg)
        assert t2 <= cfg.buckets.seq_len and t3 <= cfg.buckets.seq_len
        assert cfg.buckets.seq_len % 128 == 0
    mix = P.default_config()
    mix.cxr_per_batch, mix.ct_per_batch = 192, 64
    got = P.bucket_shapes(mix)
    assert 1 <= len(got) <= 4
    assert all(g2[1:] == (2048, 128, 14**2) and g3[1:] == (2048, 128, 14**3) for g2, g3 in got)
    s1 = P.bucket_shapes(P.default_config())  # stage 1: one 2D group, P*P wide patches
    assert all(len(s) == 1 and s[0][3] == 14 * 14 for s in s1)
    assert P.num_samples_global(mix, 4) == 256
    with pytest.raises(ValueError, match="divisible"):
        P.num_samples_global(mix, 5)


class _ThreadGather:
    """An all-gather between iterators driven by threads (stands in for the processes'
    collective); records every table it hands out."""

    def __init__(self, n):
        import threading

        self.n, self.slots, self.tables = n, [None] * n, []
        self.barrier = threading.Barrier(n)

    def for_process(self, p):
        def gather(local):
            self.slots[p] = np.array(local)
            self.barrier.wait()
            table = np.stack(self.slots)
            if p == 0:
                self.tables.append(table)
            self.barrier.wait()
            return table

        return gather


def _run_processes(cfg, n_proc, steps, seed=5, state=None):
    """``steps`` batches of each of ``n_proc`` simulated processes (threads), in lockstep."""
    from concurrent.futures import ThreadPoolExecutor

    g = _ThreadGather(n_proc)
    its = [
        P.make_train_iterator(
            cfg, seed=seed, process_index=p, process_count=n_proc, gather=g.for_process(p)
        )
        for p in range(n_proc)
    ]
    if state is not None:
        for it in its:
            it.set_state(state)

    def run(p):
        return [next(its[p]) for _ in range(steps)]

    with ThreadPoolExecutor(n_proc) as ex:
        out = list(ex.map(run, range(n_proc)))
    return out, [it.get_state() for it in its], g.tables


def test_processes_agree_on_one_bucket_when_local_needs_differ(demo):
    # two buckets a process can need (2 or 4 rows of 256 tokens for 2 CXR + 1 CT)
    cfg = _cfg(demo, rows_multiple_of=1)
    cfg.buckets.rows_2d = (1, 2)
    cfg.buckets.rows_3d = (1, 2)
    out, states, tables = _run_processes(cfg, 2, 8)
    needs = np.stack([t[:, :2] for t in tables])  # [step, process, group] rows needed
    assert (needs[:, 0] != needs[:, 1]).any(), "data too uniform to test the agreement"
    for step in range(8):
        shapes = {tuple(g.segment_ids.shape for g in b) for b, _ in (out[0][step], out[1][step])}
        assert len(shapes) == 1, (step, shapes)
        s0, s1 = out[0][step][1], out[1][step][1]
        assert (
            s0["real_tokens"]
            == s1["real_tokens"]
            == sum(
                int((g.segment_ids > 0).sum()) for b, _ in (out[0][step], out[1][step]) for g in b
            )
        )
    assert states[0] == states[1]


def test_state_is_topology_free(demo):
    cfg = _cfg(demo)
    ref = P.make_train_iterator(cfg, seed=5)
    ref_batches = [next(ref)[0] for _ in range(5)]
    _, states, _ = _run_processes(cfg, 2, 3)  # written by 2 processes ...
    one = P.make_train_iterator(cfg, seed=5)  # ... restored into 1
    one.set_state(json.loads(json.dumps(states[0])))
    assert _same(next(one)[0], ref_batches[3])
    state = one.get_state()  # and from 1 back into 2
    out, _, _ = _run_processes(cfg, 2, 1, state=state)
    tokens = lambda bs: sorted(
        np.round(
            np.concatenate([b.patches[b.segment_ids > 0].sum(-1) for b in map(join_groups, bs)]), 3
        ).tolist()
    )
    assert tokens([o[0][0] for o in out]) == tokens([ref_batches[4]])
