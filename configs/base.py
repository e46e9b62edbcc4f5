"""Base config: every knob a run may change; stage configs override it.

Not run directly; see configs/stage1_2d.py, stage2_curriculum.py, stage3_joint.py, demo.py.
"""

import ml_collections

from mmv_jax.data import pipeline
from mmv_jax.train.sharding import DEFAULT_RULES


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.init_from = ""  # workdir/checkpoint of another run: params only, fresh optimizer
    c.max_nonfinite_steps = 20  # stop after this many skipped (non-finite) updates in a row
    c.peak_flops_per_device = 0.0  # 0: vendor table for accelerators, measured on CPU
    c.prefetch_to_device = 2  # batches already copied to the devices ahead of the step
    c.allow_config_change = False  # resume with changed model/loss/optim/global batch (workdir.py)
    c.require_platform = ""  # "" any; "cpu" / "gpu" / "tpu": fail fast when JAX runs elsewhere
    c.lock_stale_s = 600.0  # another host's workdir lock unrefreshed this long is stale
    # evaluation during training (mmv_jax/train/evaluate.py): every N steps, embed <= max_images
    # labelled train and data.eval_split images and write a linear probe's AUROC; 0: off
    c.eval_every_steps = 0
    c.eval = ml_collections.ConfigDict()
    c.eval.max_images = 256  # per split (train, data.eval_split), a seeded choice
    c.eval.batch_size = 16  # images per embedding batch
    c.eval.probe_c = 1.0  # inverse L2 strength of the logistic-regression probe

    c.model = ml_collections.ConfigDict()
    c.model.variant = "B/14"
    c.model.depth = 0  # 0: the variant's depth (12)
    c.model.dtype = "bfloat16"  # compute dtype; params stay fp32
    # what each block keeps for backward: none | nothing_saveable (recompute the whole block) |
    # dots_saveable | dots_with_no_batch_dims_saveable (jax.checkpoint_policies)
    c.model.remat_policy = "none"
    c.model.scan_layers = (
        False  # one lax.scan over the blocks: compiles the block once (deep models)
    )
    c.model.attention_impl = "auto"  # auto | xla | pallas_tpu | triton_gpu | reference (dense)
    c.model.max_segment_len = (
        -1
    )  # largest view in tokens; -1: from data.views; 0: dense XLA attention
    c.model.proj_hidden = 2048
    c.model.proj_dim = 128
    c.model.proj_layers = 3
    c.model.proj_norm = (
        "batch"  # LeJEPA reference: BatchNorm over the batch's real views; or "layer"
    )

    c.loss = ml_collections.ConfigDict()
    c.loss.lam = 0.025
    c.loss.num_slices = 256
    # "mean": the squared distance averaged over the projection dims, as the LeJEPA reference
    # computes it ((centers - proj).square().mean()); lam = 0.025 was tuned with that, and the
    # paper runs use it. "sum" (the squared L2 norm as the papers write it) weights SIGReg
    # proj_dim (128) times less against the prediction loss.
    c.loss.pred_reduce = "mean"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1_000
    c.optim.final_lr_ratio = 0.0
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    # logical axis -> mesh axes: rows over data x fsdp, weights over fsdp, heads and mlp over tensor
    c.mesh.rules = DEFAULT_RULES

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port; empty = auto (TPU slice / SLURM / single host)
    c.distributed.num_processes = -1
    c.distributed.process_id = -1
    # seconds (mmv_jax/train/distributed.py): a host silent this long is declared dead and the
    # others exit with an error; a finished process waits this long for the rest at exit
    c.distributed.initialization_timeout_s = 300
    c.distributed.heartbeat_timeout_s = 100
    c.distributed.shutdown_timeout_s = 300

    c.data = pipeline.default_config()
    c.data.patch_dtype = (
        "bfloat16"  # what the bf16 model computes with: half the bytes, same numbers
    )
    c.data.worker_count = -1  # Grain worker processes sized from the host (data.config.workers)
    return c
