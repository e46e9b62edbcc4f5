"""Stage 3 (paper, native joint): from scratch on the mixed stream, 192 X-rays + 64 CT a step.

Run:
  mmv-train --config configs/stage3_joint.py --workdir runs/stage3 \
      --config.data.manifest=/data/manifests/mixed.jsonl
Pod compile check from a laptop:
  python tools/aot_compile.py --config configs/stage3_joint.py --topology v5e:4x4
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.cxr_per_batch = 192
    c.data.ct_per_batch = 64
    return c
