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
- ``pack_seconds_per_batch_{stage1,mix}``: first-fit decreasing + writing one batch in the
  stage configs' wire format (steady state; ``pack_seconds_first_batch_*`` includes the first
  touch of the memory), and its size (``*_batch_gb``);
- ``wire_bytes_per_real_token_mix``: bytes shipped to the devices per real token on the mix
  (row groups padded to their buckets, bfloat16 patches as the stage configs ship them), and the
  same for float32 and uint8 patches and for the one-group float32 layout the row groups
  replaced (``_one_group_float32``, without its bucket padding: a lower bound);
- ``tokens_per_s_per_worker_mix``: the whole batch build of one worker from the cache (read,
  views, pack in the wire format) on the mix, real tokens/s (``batch_build_s_mix`` a batch).

Targets: packing efficiency >= 0.97, <= 4 shapes, from the cache >= 200 CXR and >= 20 CT
samples/s per worker (issue 3); <= 2,500 wire bytes per real token and >= 150,000 tokens/s per
worker on the mix (issue 17).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mmv_jax.batch import PATCH
from mmv_jax.data import packing, pipeline as P
from mmv_jax.data.manifest import load_manifest, write_manifest
from mmv_jax.data.transforms import resize
from mmv_jax.data.views import view_tokens


def _write_originals(root: str, n_cxr: int, n_ct: int) -> str:
    import nibabel as nib
    import pydicom
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless

    from mmv_jax.data.synthetic import _findings, ct_phantom, cxr_phantom, write_cxr_dicom

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
    views = dict(
        P._view_kwargs(cfg),
        long_side_2d=int(cfg.views.long_side_2d),
        long_side_3d=int(cfg.views.long_side_3d),
        flips=tuple(cfg.views.flips),
    )
    P.prepare_views(records[0], np.random.default_rng(0), 0, views, tuple(cfg.ct_window))  # warm
    t = time.perf_counter()
    n = 0
    for r in range(reps):
        for i, rec in enumerate(records):
            P.prepare_views(rec, np.random.default_rng([r, i]), i, views, tuple(cfg.ct_window))
            n += 1
    return n / (time.perf_counter() - t)


def _mix_config(manifest: str = "", dtype: str = "bfloat16"):
    """The paper's stage-3 step: 192 CXR + 64 CT, with the stage configs' wire dtype."""
    mix = P.default_config()
    mix.manifest, mix.cxr_per_batch, mix.ct_per_batch = manifest, 192, 64
    mix.buckets.nominal_cxr_shape = (1, 224, 186)
    mix.patch_dtype = dtype
    return mix


def _batch_build(manifest: str, steps: int) -> dict:
    """The whole train-batch build of one worker from the cache (read, views, pack into the wire
    format), as a Grain worker runs it: ``_TrainSource[step]``, one process."""
    src = P._TrainSource(_mix_config(manifest), seed=0, process_index=0, process_count=1)
    src[0]  # warm: permutations, page faults
    t, tokens = time.perf_counter(), 0
    for step in range(1, steps + 1):
        batch, info = src[step]
        tokens += int(info["real_tokens"])
    dt = time.perf_counter() - t
    return {
        "tokens_per_s_per_worker_mix": round(tokens / dt),
        "batch_build_s_mix": round(dt / steps, 3),
    }


def _wire_bytes(cxr_shapes, ct_shapes, batches: int = 8) -> dict:
    """Bytes that cross to the devices per real token on the paper's mix, as the train
    iterator ships a step (row groups padded to their buckets), by wire dtype; and the
    one-group float32 layout (every token P**3 wide) it replaced."""
    from mmv_jax.batch import View, nbytes, wire_dtype

    rng = np.random.default_rng(3)
    out: dict = {}
    for name in ("bfloat16", "float32", "uint8", "one_group_float32"):
        mix = _mix_config(dtype="float32" if name == "one_group_float32" else name)
        groups, buckets = P.bucket_rows(mix, shapes={"cxr": cxr_shapes, "ct": ct_shapes})
        s, slots = int(mix.buckets.seq_len), int(mix.buckets.slots)
        total_bytes = total_tokens = 0
        for _ in range(batches):
            views = []
            for smp in range(256):
                is_ct = smp >= 192
                shapes = ct_shapes if is_ct else cxr_shapes
                shape = shapes[int(rng.integers(len(shapes)))]
                width = PATCH**3 if is_ct else PATCH * PATCH
                for idx, n in enumerate(view_tokens(rng, shape, **P._view_kwargs(mix))):
                    views.append(
                        View(
                            np.zeros((n, width), np.float32),
                            np.zeros((n, 3), np.float32),
                            smp,
                            idx < 2,
                            int(is_ct),
                            idx,
                        )
                    )
            if name == "one_group_float32":
                batch, _ = packing.pack_compact(views, s, slots, PATCH**3)  # (no bucket padding)
            else:
                parts, need = packing.pack_groups(views, groups, s, slots, wire_dtype(name))
                rows = packing.bucket_for(tuple(int(n) for n in need), buckets)
                batch = tuple(packing.pad_rows(g, r) for g, r in zip(parts, rows))
            total_bytes += nbytes(batch)
            total_tokens += sum(v.num_tokens for v in views)
        key = "wire_bytes_per_real_token_mix" + ("" if name == "bfloat16" else f"_{name}")
        out[key] = round(total_bytes / total_tokens)
    return out


def _packing_sim(cfg, n_batches: int, cxr_shapes, ct_shapes, seed: int = 0) -> dict:
    """Packing efficiency and step shapes over ``n_batches`` simulated steps (token counts only):
    each modality's views fill their own row group; the step takes the cheapest bucket."""
    groups, buckets = P.bucket_rows(cfg, shapes={"cxr": cxr_shapes, "ct": ct_shapes})
    s, slots = int(cfg.buckets.seq_len), int(cfg.buckets.slots)
    vk = P._view_kwargs(cfg)
    rng = np.random.default_rng(seed + 1)
    eff, shapes = [], set()
    draws = {"2d": (cxr_shapes, cfg.cxr_per_batch), "3d": (ct_shapes, cfg.ct_per_batch)}
    for _ in range(n_batches):
        need, real = [], 0
        for g in groups:
            shapes_m, count = draws[g]
            sizes = []
            for j in rng.integers(0, len(shapes_m), int(count)):
                sizes += view_tokens(rng, shapes_m[j], **vk)
            need.append(packing.rows_needed(sizes, s, slots))
            real += sum(sizes)
        shape = packing.bucket_for(tuple(need), buckets)
        shapes.add(shape)
        eff.append(real / (sum(shape) * s))
    return dict(
        packing_efficiency=float(np.mean(eff)),
        packing_efficiency_min=float(np.min(eff)),
        distinct_shapes=len(shapes),
        buckets=[list(b) for b in buckets],
        groups=list(groups),
        seq_len=s,
    )


def run(argv) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py data")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--n-cxr", type=int, default=6)
    ap.add_argument("--n-ct", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="passes over the cached files")
    ap.add_argument("--build-steps", type=int, default=3, help="mix batches built from the cache")
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
        out["cxr_j2k_dicom_samples_per_s_per_worker_original"] = round(
            _per_sample_rate(j2k, cfg), 2
        )
        out["ct_samples_per_s_per_worker_original"] = round(_per_sample_rate(ct, cfg), 2)
        from mmv_jax.data.cache import build_cache

        t = time.perf_counter()
        build_cache(man, os.path.join(tmp, "cache"), workers=1, progress=False)
        out["cache_build_s_per_image"] = round((time.perf_counter() - t) / len(recs), 3)
        cached = load_manifest(os.path.join(tmp, "cache", "manifest.jsonl"))
        c_cxr = [r for r in cached if r.modality == "cxr"]
        c_ct = [r for r in cached if r.modality == "ct"]
        out["cxr_samples_per_s_per_worker"] = round(
            _per_sample_rate(c_cxr * max(1, 40 // len(c_cxr)), cfg, a.reps), 1
        )
        out["ct_samples_per_s_per_worker"] = round(
            _per_sample_rate(c_ct * max(1, 12 // len(c_ct)), cfg, a.reps), 1
        )
        out.update(_batch_build(os.path.join(tmp, "cache", "manifest.jsonl"), a.build_steps))
    # packing on the paper's mix (view sizes from MIMIC-CXR-JPG / CT-RATE-like resized shapes)
    prng = np.random.default_rng(0)
    cxr_shapes = (
        [(1, 224, int(224 * prng.uniform(0.78, 0.9))) for _ in range(64)]
        + [(1, int(224 * prng.uniform(0.8, 0.95)), 224) for _ in range(8)]
        + [(1, 224, 224)] * 8
    )
    ct_shapes = [(int(112 * prng.uniform(0.7, 1.0)), 112, 112) for _ in range(64)]
    mix = _mix_config()
    out.update(_wire_bytes(cxr_shapes, ct_shapes))
    t = time.perf_counter()
    out.update(_packing_sim(mix, a.batches, cxr_shapes, ct_shapes))
    s1 = _mix_config()
    s1.cxr_per_batch, s1.ct_per_batch = 256, 0
    out.update(
        {
            f"stage1_{k}": v
            for k, v in _packing_sim(s1, max(1, a.batches // 4), cxr_shapes, ct_shapes).items()
        }
    )
    out["packing_sim_s"] = round(time.perf_counter() - t, 1)
    # packer speed (steady state: the first call of a process also pays the page faults)
    rng = np.random.default_rng(0)
    from mmv_jax.batch import View, nbytes, wire_dtype

    for name, cfg_ in (("stage1", s1), ("mix", mix)):
        views = []
        n_cxr = int(cfg_.cxr_per_batch)
        for smp in range(n_cxr + int(cfg_.ct_per_batch)):
            is_ct = smp >= n_cxr
            shape = ct_shapes[smp % len(ct_shapes)] if is_ct else cxr_shapes[smp % len(cxr_shapes)]
            width = PATCH**3 if is_ct else PATCH * PATCH
            for idx, n in enumerate(view_tokens(rng, shape, **P._view_kwargs(cfg_))):
                views.append(
                    View(
                        np.ones((n, width), np.float32),
                        np.zeros((n, 3), np.float32),
                        smp,
                        idx < 2,
                        int(is_ct),
                        idx,
                    )
                )
        groups, _ = P.bucket_rows(cfg_, shapes={"cxr": cxr_shapes, "ct": ct_shapes})
        times = []
        for _ in range(3):
            t = time.perf_counter()
            b, _ = packing.pack_groups(
                views,
                groups,
                int(cfg_.buckets.seq_len),
                int(cfg_.buckets.slots),
                wire_dtype(cfg_.patch_dtype),
            )
            times.append(time.perf_counter() - t)
            out[f"{name}_batch_gb"] = round(nbytes(b) / 1e9, 3)
            del b
        out[f"pack_seconds_per_batch_{name}"] = round(float(np.median(times[1:])), 3)
        out[f"pack_seconds_first_batch_{name}"] = round(times[0], 3)
    out["targets"] = dict(
        packing_efficiency=0.97,
        distinct_shapes=4,
        cxr_samples_per_s_per_worker=200,
        ct_samples_per_s_per_worker=20,
        wire_bytes_per_real_token_mix=2500,
        tokens_per_s_per_worker_mix=150_000,
    )
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1:]), indent=1, sort_keys=True))
