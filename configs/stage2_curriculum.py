"""Stage 2 (paper, curriculum): initialise from stage 1, continue on the mixed stream
(192 X-rays + 64 CT volumes a step); optimizer state starts fresh.

Run:
  mmv-train --config configs/stage2_curriculum.py --workdir runs/stage2 \
      --config.init_from=runs/stage1 --config.data.manifest=/data/manifests/mixed.jsonl
"""

from configs import base


def get_config():
    c = base.get_config()
    c.init_from = "runs/stage1"
    c.data.cxr_per_batch = 192
    c.data.ct_per_batch = 64
    return c
