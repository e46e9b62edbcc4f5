"""Stage 1 (paper): 2D only, 256 chest X-rays a step, ViT-B/14, LeJEPA, AdamW lr 1e-4.

Run (one host; on a pod or cluster see launch/tpu_pod.sh, launch/slurm_gpu.sbatch):
  mmv-train --config configs/stage1_2d.py --workdir runs/stage1 \
      --config.data.manifest=/data/manifests/mimic_cxr.jsonl
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.cxr_per_batch = 256
    c.data.ct_per_batch = 0
    c.model.max_segment_len = -1  # 2D only: the largest 2D view (256 tokens)
    return c
