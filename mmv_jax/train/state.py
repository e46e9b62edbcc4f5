"""Train state, the model and optimizer built from config, created already sharded."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmv_jax.data import pipeline
from mmv_jax.errors import ConfigError
from mmv_jax.kernels.attention import IMPLS
from mmv_jax.model.encoder import EncoderConfig, encoder_config
from mmv_jax.model.heads import MultiMedVision
from mmv_jax.train import sharding as shd


class TrainState(NamedTuple):
    params: Any  # nnx.State of the model's Params (fp32)
    opt_state: Any
    step: Any  # int32 scalar
    rng: Any  # base PRNG key; step keys are fold_in(rng, step)
    nonfinite: Any  # int32: consecutive skipped (non-finite) updates


def encoder_config_from(cfg) -> EncoderConfig:
    m = cfg.model
    if m.attention_impl not in IMPLS:
        raise ConfigError(
            f"config.model.attention_impl must be one of {IMPLS}, got {m.attention_impl!r}"
        )
    extra = {"depth": m.depth} if m.get("depth") else {}
    max_len = m.max_segment_len
    if max_len == -1:  # the largest view the data config can produce
        max_2d, max_3d = pipeline.max_view_tokens(cfg.data)
        max_len = max_3d if cfg.data.ct_per_batch else max_2d
    return encoder_config(
        m.variant,
        dtype=m.dtype,
        remat_policy=m.remat_policy,
        scan_layers=bool(m.scan_layers),
        attention_impl=m.attention_impl,
        max_segment_len=max_len or None,
        **extra,
    )


def build_model(cfg, *, seed: int = 0) -> MultiMedVision:
    m = cfg.model
    return MultiMedVision(
        encoder_config_from(cfg),
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
        proj_layers=m.proj_layers,
        proj_norm=m.proj_norm,
        rngs=nnx.Rngs(seed),
    )


def _decay_mask(params):
    """Weight decay on weights only, decided by parameter name: never on biases (``bias``,
    ``qkv_bias``, ``proj_bias``) nor on a norm's parameters. Not by shape: ``qkv_bias`` is
    ``[3, H, Dh]`` and a multi-dimensional bias is still a bias."""

    def decay(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        names = [n for n in names if n != "value"]  # nnx.Variable's own attribute
        leaf = names[-1] if names else ""
        is_bias = leaf == "bias" or leaf.endswith("_bias")
        return not (is_bias or leaf == "scale" or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decay, params)


def learning_rate(cfg, step):
    """The learning rate at ``step``: linear warm-up from 0 to ``optim.lr``, then cosine decay
    to ``lr * final_lr_ratio`` at ``total_steps`` (the optimizer's schedule)."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(cfg.total_steps, o.warmup_steps + 1),
        end_value=o.lr * o.final_lr_ratio,
    )(step)


def make_optimizer(cfg) -> optax.GradientTransformation:
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            functools.partial(learning_rate, cfg),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)


def _init_params(cfg):
    return nnx.state(build_model(cfg, seed=cfg.seed), nnx.Param)


def abstract_params(cfg, mesh):
    """``(graphdef, abstract params, their shardings over mesh)`` of ``cfg``'s model; nothing
    is allocated."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=cfg.seed)), nnx.Param)
    return graphdef, params, shd.param_shardings(params, mesh, shd.rules_dict(cfg.mesh.rules))


def init_params(cfg, shardings):
    """The model's seeded initial params, each created directly in its sharding."""
    return jax.jit(functools.partial(_init_params, cfg), out_shardings=shardings)()


def _shardings_and_init(cfg, mesh, tx):
    graphdef, params, p_shard = abstract_params(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        params=p_shard,
        opt_state=shd.opt_state_shardings(tx, params, p_shard, mesh),
        step=replicated,
        rng=replicated,
        nonfinite=replicated,
    )

    def init():
        params = _init_params(cfg)
        return TrainState(
            params,
            tx.init(params),
            jnp.zeros((), jnp.int32),
            jax.random.PRNGKey(cfg.seed + 1),
            jnp.zeros((), jnp.int32),
        )

    return graphdef, shardings, init


def create(cfg, mesh, tx):
    """(graphdef, state, state_shardings) with every array created directly in its sharding."""
    graphdef, shardings, init = _shardings_and_init(cfg, mesh, tx)
    return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def abstract(cfg, mesh, tx):
    """(graphdef, abstract state with shardings, state_shardings): nothing is allocated, so
    this works for meshes over devices this machine does not have (AOT compiles)."""
    graphdef, shardings, init = _shardings_and_init(cfg, mesh, tx)
    shapes = jax.eval_shape(init)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return graphdef, state, shardings
