"""The train step: a pure function over ``(graphdef, state)``, jitted with explicit shardings.

A non-finite loss or gradient leaves params and optimizer state unchanged and increments
``state.nonfinite`` (the loop stops the run after ``config.max_nonfinite_steps`` in a row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmv_jax.batch import PackedBatch, groups
from mmv_jax.kernels.attention import resolve_platform
from mmv_jax.model.axes import axis_rules
from mmv_jax.objectives.lejepa import lejepa_loss
from mmv_jax.train.state import TrainState


def loss_fn(
    params,
    graphdef,
    batch: PackedBatch,
    key,
    *,
    num_samples: int,
    num_views: int,
    lam: float,
    num_slices: int,
    pred_reduce: str = "sum",
):
    model = nnx.merge(graphdef, params)
    _, proj = model(batch)
    views = [
        jnp.concatenate([getattr(g, f) for g in groups(batch)])
        for f in ("view_sample", "view_is_global", "view_index")
    ]
    return lejepa_loss(
        proj,
        *views,
        num_samples=num_samples,
        num_views=num_views,
        key=key,
        lam=lam,
        num_slices=num_slices,
        pred_reduce=pred_reduce,
    )


def train_step(
    state: TrainState,
    batch: PackedBatch,
    *,
    graphdef,
    tx,
    schedule,
    num_samples,
    num_views,
    lam,
    num_slices,
    pred_reduce="sum",
):
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(
        state.params,
        graphdef,
        batch,
        key,
        num_samples=num_samples,
        num_views=num_views,
        lam=lam,
        num_slices=num_slices,
        pred_reduce=pred_reduce,
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A conditional, not a select over every leaf: a select is one more pass over the params
    # and both Adam moments, and the update can stay in place.
    new_params, new_opt = jax.lax.cond(
        finite, update, lambda p, o: (p, o), state.params, state.opt_state
    )
    new_state = TrainState(
        params=new_params,
        opt_state=new_opt,
        step=state.step + 1,
        rng=state.rng,
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "pred_loss": aux["pred_loss"],
        "sigreg_loss": aux["sigreg_loss"],
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "finite": finite,
    }
    return new_state, metrics


def compiler_options(cfg, platform: str) -> dict | None:
    """XLA options for the step on ``platform``: none on GPU and TPU.

    On CPU with remat: ``jax.checkpoint`` keeps XLA's CSE from merging the backward
    recomputation into the forward through optimisation barriers, and XLA:CPU strips those
    barriers (its ``cse_barrier_expander`` pass) before CSE runs, which silently undoes remat.
    Keeping the pass off restores it."""
    if platform == "cpu" and cfg.model.remat_policy != "none":
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


def jit_train_step(
    cfg,
    graphdef,
    tx,
    schedule,
    state_shardings,
    batch_shardings,
    mesh,
    rules,
    *,
    num_samples: int,
    num_views: int,
):
    """``step(state, batch) -> (state, metrics)``: jitted, state donated, shardings explicit.

    Tracing happens inside ``axis_rules(mesh, rules)`` so activations are constrained."""
    fn = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        num_samples=num_samples,
        num_views=num_views,
        lam=cfg.loss.lam,
        num_slices=cfg.loss.num_slices,
        pred_reduce=cfg.loss.pred_reduce,
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    options = compiler_options(cfg, resolve_platform(mesh))
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=options,
    )

    class Step:
        """Calls and lowers the jitted step inside the activation-sharding rules."""

        def __call__(self, state, batch):
            with axis_rules(mesh, rules):
                return jitted(state, batch)

        def lower(self, state, batch):
            with axis_rules(mesh, rules):
                return jitted.lower(state, batch)

        @property
        def compiles(self) -> int:
            """Executables of this step compiled so far (one per bucket shape)."""
            return jitted._cache_size()

    return Step()


def setup(cfg, mesh, *, num_samples: int, num_views: int, abstract: bool = False):
    """Everything a run needs around the step: ``(step, state, state_shardings, batch_shardings)``.

    ``abstract=True`` builds shape-only state (for AOT compiles on devices this machine lacks)."""
    from mmv_jax.train import sharding as shd, state as st

    rules = shd.rules_dict(cfg.mesh.rules)
    tx = st.make_optimizer(cfg)
    graphdef, state, state_sh = (st.abstract if abstract else st.create)(cfg, mesh, tx)
    batch_sh = shd.batch_shardings(mesh, rules)
    step = jit_train_step(
        cfg,
        graphdef,
        tx,
        lambda s: st.learning_rate(cfg, s),
        state_sh,
        batch_sh,
        mesh,
        rules,
        num_samples=num_samples,
        num_views=num_views,
    )
    return step, state, state_sh, batch_sh
