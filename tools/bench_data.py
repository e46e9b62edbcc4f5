"""Data pipeline benchmark: ``python tools/bench.py data [--batches 1000] [--n-cxr 6 --n-ct 2]``.

Measures, on one core (one worker process = the sequential per-sample work a Grain worker does):

- ``cxr_samples_per_s_per_worker`` / ``ct_samples_per_s_per_worker``: samples/s from the
  ``mmv-cache`` output (decode .npy, normalise, 2 global + 8 local views, patchify);
- ``*_original``: the same from the original formats: full-size chest radiographs as
  MIMIC-CXR-JPG-like JPEG (3056 x 2544) and as JPEG 2000 DICOM, and a CT-RATE-sized .nii.gz
  (512 x 512 x 200 int16), including decode, reorientation and resize;
- ``packing_efficiency`` (mean, and min) and ``distinct_shapes`` over ``--batches`` batches of
  the paper's mix (192 CXR + 64 CT, seq_len 2048, automatic buckets), with view sizes drawn by the
  same sampler as training on MIMIC-CXR-JPG / CT-RATE-like shapes after resizing; the same for
  stage 1 (256 CXR) under ``stage1_*``;
- ``pack_seconds_per_batch_{stage1,mix}``: first-fit decreasing + writing one batch (steady
  state; ``pack_seconds_first_batch_*`` includes the first touch of the memory), and the size of
  its ``patches`` array (``*_batch_gb``: mixed batches are P^3 = 2744 wide).

Targets (issue 3): packing efficiency >= 0.97, <= 4 shapes, from the cache >= 200 CXR and >= 20 CT
samples/s per worker.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mmv_jax.batch import PATCH
from mmv_jax.data import packing
from mmv_jax.data import pipeline as P
from mmv_jax.data.manifest import load_manifest, write_manifest
from mmv_jax.data.transforms import resize
from mmv_jax.data.views import view_tokens


def _write_originals(root: str, n_cxr: int, n_ct: int) -> str:
    from PIL import Image
    import nibabel as nib
    import pydicom
    from pydicom.uid import JPEG2000Lossless
    from mmv_jax.data.synthetic import ct_phantom, cxr_phantom, write_cxr_dicom, _findings

    recs = []
    rng = np.random.default_rng(0)
    for i in range(n_cxr):
        labels = _findings(rng)
        mu = cxr_phantom(rng, 382, 318, labels)
        big = resize(mu[None], (1, 3056, 2544))[0]
        big += rng.normal(0, 0.01, big.shape).astype(np.float32)
        img = (np.clip(big / 1.9, 0, 1) * 255).astype(np.uint8)
        p = os.path.join(root, f"cxr{i}.jpg")
        Image.fromarray(img).save(p, quality=95)
        recs.append(dict(id=f"jpg{i}", path=p, modality="cxr", dataset="bench", split="train"))
        if i < max(1, n_cxr // 3):  # a few JPEG 2000 DICOMs as well
            d = os.path.join(root, f"cxr{i}.dcm")
            write_cxr_dicom(d, big, index=i, spacing=0.139, monochrome1=True, patient="bench")
            ds = pydicom.dcmread(d)
            ds.compress(JPEG2000Lossless)
            ds.save_as(d)
            recs.append(dict(id=f"j2k{i}", path=d, modality="cxr", dataset="bench", split="j2k"))
    for i in range(n_ct):
        labels = _findings(rng)
        hu = ct_phantom(rng, (50, 96, 96), labels)
        big = resize(hu, (200, 512, 512))
        big += rng.normal(0, 10, big.shape).astype(np.float32)
        data = np.round(big).astype(np.int16).transpose(2, 1, 0)
        p = os.path.join(root, f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(data, np.diag([-0.7, -0.7, 1.5, 1.0])), p)
        recs.append(dict(id=f"ct{i}", path=p, modality="ct", dataset="bench", split="train"))
    path = os.path.join(root, "manifest.jsonl")
    write_manifest(path, recs)
    return path


def _per_sample_rate(records, cfg, reps: int = 1) -> float:
    views = dict(P._view_kwargs(cfg), long_side_2d=int(cfg.views.long_side_2d),
                 long_side_3d=int(cfg.views.long_side_3d), flips=tuple(cfg.views.flips))
    P.prepare_views(records[0], np.random.default_rng(0), 0, views, tuple(cfg.ct_window))  # warm
    t = time.perf_counter()
    n = 0
    for r in range(reps):
        for i, rec in enumerate(records):
            P.prepare_views(rec, np.random.default_rng([r, i]), i, views, tuple(cfg.ct_window))
            n += 1
    return n / (time.perf_counter() - t)


def _packing_sim(cfg, n_batches: int, cxr_shapes, ct_shapes, seed: int = 0) -> dict:
    rows = P.bucket_rows(cfg, shapes={"cxr": cxr_shapes, "ct": ct_shapes})
    s, slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    vk = P._view_kwargs(cfg)
    rng = np.random.default_rng(seed + 1)
    eff, shapes = [], set()
    for _ in range(n_batches):
        sizes = []
        for shapes_m, count in ((cxr_shapes, cfg.cxr_per_batch), (ct_shapes, cfg.ct_per_batch)):
            for j in rng.integers(0, len(shapes_m), int(count)):
                sizes += view_tokens(rng, shapes_m[j], **vk)
        need = packing.rows_needed(sizes, s, slots)
        r = min(x for x in rows if x >= need)
        shapes.add(r)
        eff.append(sum(sizes) / (r * s))
    return dict(packing_efficiency=float(np.mean(eff)), packing_efficiency_min=float(np.min(eff)),
                distinct_shapes=len(shapes), bucket_rows=list(rows), seq_len=s)


def run(argv) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py data")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--n-cxr", type=int, default=6)
    ap.add_argument("--n-ct", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="passes over the cached files")
    a = ap.parse_args(argv)
    out: dict = {}
    cfg = P.default_config()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        man = _write_originals(tmp, a.n_cxr, a.n_ct)
        out["setup_s"] = round(time.perf_counter() - t, 2)
        recs = load_manifest(man)
        jpg = [r for r in recs if r.split == "train" and r.modality == "cxr"]
        j2k = [r for r in recs if r.split == "j2k"]
        ct = [r for r in recs if r.modality == "ct"]
        out["cxr_samples_per_s_per_worker_original"] = round(_per_sample_rate(jpg, cfg), 2)
        out["cxr_j2k_dicom_samples_per_s_per_worker_original"] = round(_per_sample_rate(j2k, cfg), 2)
        out["ct_samples_per_s_per_worker_original"] = round(_per_sample_rate(ct, cfg), 2)
        from mmv_jax.data.cache import build_cache
        t = time.perf_counter()
        build_cache(man, os.path.join(tmp, "cache"), workers=1, progress=False)
        out["cache_build_s_per_image"] = round((time.perf_counter() - t) / len(recs), 3)
        cached = load_manifest(os.path.join(tmp, "cache", "manifest.jsonl"))
        c_cxr = [r for r in cached if r.modality == "cxr"]
        c_ct = [r for r in cached if r.modality == "ct"]
        out["cxr_samples_per_s_per_worker"] = round(
            _per_sample_rate(c_cxr * max(1, 40 // len(c_cxr)), cfg, a.reps), 1)
        out["ct_samples_per_s_per_worker"] = round(
            _per_sample_rate(c_ct * max(1, 12 // len(c_ct)), cfg, a.reps), 1)
    # packing on the paper's mix (view sizes from MIMIC-CXR-JPG / CT-RATE-like resized shapes)
    prng = np.random.default_rng(0)
    cxr_shapes = [(1, 224, int(224 * prng.uniform(0.78, 0.9))) for _ in range(64)] + \
                 [(1, int(224 * prng.uniform(0.8, 0.95)), 224) for _ in range(8)] + [(1, 224, 224)] * 8
    ct_shapes = [(int(112 * prng.uniform(0.7, 1.0)), 112, 112) for _ in range(64)]
    mix = P.default_config()
    mix.cxr_per_batch, mix.ct_per_batch = 192, 64
    mix.buckets.nominal_cxr_shape = (1, 224, 186)
    t = time.perf_counter()
    out.update(_packing_sim(mix, a.batches, cxr_shapes, ct_shapes))
    s1 = P.default_config()
    s1.cxr_per_batch, s1.ct_per_batch = 256, 0
    out.update({f"stage1_{k}": v for k, v in
                _packing_sim(s1, max(1, a.batches // 4), cxr_shapes, ct_shapes).items()})
    out["packing_sim_s"] = round(time.perf_counter() - t, 1)
    # packer speed (steady state: the first call of a process also pays the page faults)
    rng = np.random.default_rng(0)
    from mmv_jax.batch import View
    for name, cfg_, pd in (("stage1", s1, PATCH * PATCH), ("mix", mix, PATCH ** 3)):
        views = []
        n_cxr = int(cfg_.cxr_per_batch)
        for smp in range(n_cxr + int(cfg_.ct_per_batch)):
            is_ct = smp >= n_cxr
            shape = ct_shapes[smp % len(ct_shapes)] if is_ct else cxr_shapes[smp % len(cxr_shapes)]
            width = PATCH ** 3 if is_ct else PATCH * PATCH
            for idx, n in enumerate(view_tokens(rng, shape, **P._view_kwargs(cfg_))):
                views.append(View(np.ones((n, width), np.float32), np.zeros((n, 3), np.float32),
                                  smp, idx < 2, int(is_ct), idx))
        rows = P.bucket_rows(cfg_, shapes={"cxr": cxr_shapes, "ct": ct_shapes})
        times = []
        for _ in range(3):
            t = time.perf_counter()
            b, _ = packing.pack_batch(views, rows, int(cfg_.buckets.seq_len),
                                      int(cfg_.buckets.slots), pd)
            times.append(time.perf_counter() - t)
            out[f"{name}_batch_gb"] = round(b.patches.nbytes / 1e9, 3)
            del b
        out[f"pack_seconds_per_batch_{name}"] = round(float(np.median(times[1:])), 3)
        out[f"pack_seconds_first_batch_{name}"] = round(times[0], 3)
    out["targets"] = dict(packing_efficiency=0.97, distinct_shapes=4,
                          cxr_samples_per_s_per_worker=200, ct_samples_per_s_per_worker=20)
    return out


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(sys.argv[1:]), indent=1, sort_keys=True))
