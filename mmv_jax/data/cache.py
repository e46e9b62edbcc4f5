"""``mmv-cache``: decode, reorient, resample and resize every image of a manifest once.

    mmv-cache --manifest M.jsonl --out DIR [--workers N] [--long-side-2d 224 --long-side-3d 112]
              [--splits train val] [--max-image-voxels 1073741824]

Writes ``DIR/<modality>/<id>.npy`` (CT: int16 HU, resized to the 3D long side with isotropic
voxels; X-ray: uint16, min-max scaled to [0, 65535], resized to the 2D long side),
``DIR/manifest.jsonl`` (the input records with ``path`` pointing at the cached file,
``preprocessed: true``, the cached ``shape`` and the new ``spacing``), ``DIR/bad.jsonl`` (records
that failed to read or resize: ``id``, ``path`` and the reason, a fixed category that never quotes
a header value; the cache keeps going past them) and ``DIR/cache_info.json`` (the long sides used).
Resumable: files already written are kept (each file is written atomically). Runs over
``--workers`` processes with a progress bar. The pipeline reads it with ``data.cache_dir=DIR``
(or ``data.manifest=DIR/manifest.jsonl``); the long sides must match the config's.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import sys

import numpy as np

from mmv_jax import cli
from mmv_jax.data.manifest import ManifestError, Record, load_manifest, write_manifest
from mmv_jax.data.readers import DEFAULT_MAX_VOXELS, ImageReadError, file_errors, load_image
from mmv_jax.data.transforms import resize_long_side


class CacheError(ValueError):
    """``--out`` holds a cache built with other settings."""


def cache_name(rec: Record) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", rec.id)[:80]
    h = hashlib.sha1(rec.id.encode()).hexdigest()[:8]
    return f"{rec.modality}/{safe}-{h}.npy"


def encode(arr: np.ndarray, modality: str) -> np.ndarray:
    if modality == "ct":
        return np.clip(np.round(arr), -32768, 32767).astype(np.int16)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (65535.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.round(scaled).astype(np.uint16)


def _one(args):
    rec, out, ls2, ls3, max_voxels = args
    rel = cache_name(rec)
    dst = os.path.join(out, rel)
    if os.path.exists(dst):
        try:
            arr = np.load(dst, mmap_mode="r")
            return rec, rel, tuple(arr.shape), _spacing_of(out, rel), None
        except (OSError, ValueError):
            pass  # a damaged cached file (a crashed disk, not our atomic write): rebuild it
    try:
        # reading, resizing and encoding one file: any failure is that file's, listed by
        # category in bad.jsonl, and the cache keeps going
        with file_errors(rec.path, "caching"):
            img = load_image(rec.path, **rec.read_kwargs(), max_voxels=max_voxels)
            long_side = ls3 if rec.modality == "ct" else ls2
            arr, spacing = resize_long_side(img.array, img.spacing, long_side)
            data = encode(arr, rec.modality)
    except ImageReadError as e:
        return rec, rel, None, None, e.reason
    # writing is not the file's fault (a full disk): an error here stops the cache
    tmp = dst + f".tmp{os.getpid()}.npy"
    np.save(tmp, data)
    with open(dst[:-4] + ".json", "w") as f:
        json.dump({"spacing": list(spacing)}, f)
    os.replace(tmp, dst)
    return rec, rel, tuple(arr.shape), tuple(spacing), None


def _spacing_of(out, rel):
    try:
        with open(os.path.join(out, rel)[:-4] + ".json") as f:
            return tuple(json.load(f)["spacing"])
    except (OSError, ValueError, KeyError):
        return None


def build_cache(
    manifest: str,
    out: str,
    *,
    workers: int = 1,
    long_side_2d: int = 224,
    long_side_3d: int = 112,
    splits=None,
    progress: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict:
    records = load_manifest(manifest, splits=splits)
    out = os.path.abspath(out)
    for m in ("cxr", "ct"):
        os.makedirs(os.path.join(out, m), exist_ok=True)
    info_path = os.path.join(out, "cache_info.json")
    info = dict(
        long_side_2d=long_side_2d,
        long_side_3d=long_side_3d,
        source_manifest=os.path.abspath(manifest),
    )
    if os.path.exists(info_path):
        with open(info_path) as f:
            old = json.load(f)
        if (old.get("long_side_2d"), old.get("long_side_3d")) != (long_side_2d, long_side_3d):
            raise CacheError(
                f"{out} holds a cache with long sides {old.get('long_side_2d')}/"
                f"{old.get('long_side_3d')}; use another --out"
            )
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    jobs = [(r, out, long_side_2d, long_side_3d, int(max_voxels)) for r in records]
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc="mmv-cache", file=sys.stderr)
    if workers > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for res in pool.imap_unordered(_one, jobs, chunksize=4):
                results.append(res)
                bar and bar.update(1)
    else:
        for j in jobs:
            results.append(_one(j))
            bar and bar.update(1)
    if bar:
        bar.close()
    order = {r.id: i for i, r in enumerate(records)}
    results.sort(key=lambda x: order[x[0].id])
    good, bad = [], []
    for rec, rel, shape, spacing, reason in results:
        if reason is not None:
            bad.append(dict(id=rec.id, path=rec.path, reason=reason))
            continue
        d = rec.to_json()
        for k in ("hu_slope", "hu_intercept", "orientation"):
            d.pop(k, None)
        d.update(path=rel, preprocessed=True, shape=list(shape))
        if spacing is not None:
            d["spacing"] = [float(s) for s in spacing]
        good.append(d)
    write_manifest(os.path.join(out, "manifest.jsonl"), good, findings=records.findings)
    with open(os.path.join(out, "bad.jsonl"), "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    return dict(images=len(good), bad=len(bad), out=out)


@cli.command("mmv-cache", ManifestError, CacheError)
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="mmv-cache", description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--long-side-2d", type=int, default=224)
    ap.add_argument("--long-side-3d", type=int, default=112)
    ap.add_argument(
        "--splits",
        "--split",
        nargs="*",
        default=None,
        dest="splits",
        help="only these splits (default: all)",
    )
    ap.add_argument(
        "--max-image-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        help="refuse files whose header claims more voxels (data.max_image_voxels)",
    )
    a = ap.parse_args(argv)
    if a.max_image_voxels < 1:
        ap.error("--max-image-voxels must be >= 1")
    for flag in ("workers", "long_side_2d", "long_side_3d"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    res = build_cache(
        a.manifest,
        a.out,
        workers=a.workers,
        long_side_2d=a.long_side_2d,
        long_side_3d=a.long_side_3d,
        splits=a.splits,
        max_voxels=a.max_image_voxels,
    )
    print(
        f"cached {res['images']} images to {res['out']} ({res['bad']} unreadable, listed in "
        f"{os.path.join(res['out'], 'bad.jsonl')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
