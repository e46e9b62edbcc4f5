"""Orbax checkpoints: train state (model, optimizer, step, RNG), the data iterator's state and
checksums of the train state.

Saves are asynchronous; Orbax writes each step into a temporary folder and renames it only once
complete, so a crash while saving never touches the last good checkpoint (an unfinished one is
ignored on restore). The train state is saved sharded and restores into any mesh (Orbax
reshards); the data state is one small JSON written by process 0 (``data_state``), the same for
every topology, so a checkpoint resumes on another process or device count.

Integrity: each checkpoint holds one checksum per array of the train state (``checksums``),
computed on the devices over the global array, so it is the same for any sharding. A restore
recomputes them; a checkpoint that fails to read or whose checksums differ (a truncated file, a
flipped bit) is reported by name, moved aside as ``<step>.corrupt``, and the newest intact one
is restored instead.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mmv_jax import paths

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No intact checkpoint could be restored."""


def _leaf_checksum(x):
    """Order-free checksum of an array: sum over elements of bits(x) * hash(flat index), in
    uint32 arithmetic (exact and associative, so any sharding and reduction order agree)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif size == 1:
        bits = (
            x.astype(jnp.uint8).astype(jnp.uint32) if x.dtype != jnp.bool_ else x.astype(jnp.uint32)
        )
    else:
        raise TypeError(f"no checksum for dtype {x.dtype}")
    idx = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for d in range(1, x.ndim):
        idx = idx * jnp.uint32(x.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
    weight = (idx * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
    return [_leaf_checksum(x) for x in leaves]


def checksums(state) -> dict[str, int]:
    """``{leaf path: uint32 checksum}`` of every array in ``state`` (a collective with several
    processes: every process gets the same values)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = jax.device_get(_checksums([x for _, x in flat]))
    return {jax.tree_util.keystr(p): int(s) for (p, _), s in zip(flat, sums)}


class Checkpointer:
    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state, data_state: dict | None = None, *, force: bool = False
    ) -> bool:
        items = {
            "state": ocp.args.StandardSave(state),
            "checksums": ocp.args.JsonSave(checksums(state)),
        }
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state) -> tuple:
        """``(state, data_state)`` of checkpoint ``step``: the state in ``abstract_state``'s
        shapes and shardings, and the data iterator's state (``None`` when it has none). Raises
        :class:`CheckpointError` when it cannot be read or its checksums do not match."""
        step_dir = self.directory / str(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        for name in ("data_state", "checksums"):
            if (step_dir / name).exists():
                items[name] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # any damage to the files: report it, let the caller fall back
            raise CheckpointError(
                f"checkpoint {step_dir} cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e
        if "checksums" in items:
            want, got = out["checksums"], checksums(out["state"])
            bad = sorted(k for k in want if got.get(k) != want[k])
            if bad:
                raise CheckpointError(
                    f"checkpoint {step_dir} is corrupted: {len(bad)} arrays "
                    f"differ from their checksums (first: {bad[0]})"
                )
        data_state = out["data_state"] if "data_state" in items else _grain_state(step_dir / "data")
        return out["state"], data_state

    def restore_latest_intact(self, abstract_state) -> tuple[int | None, object, object]:
        """``(step, state, data_state)`` of the newest checkpoint that restores and verifies;
        damaged newer ones are reported and moved aside (``<step>.corrupt``). ``(None, None,
        None)`` when there is no checkpoint; :class:`CheckpointError` when none is intact."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, data_state = self.restore(step, abstract_state)
            except CheckpointError as e:
                log.error("%s; trying the previous checkpoint", e)
                self._move_aside(step)
                continue
            if data_state is None or int(data_state["step"]) != step:
                log.error(
                    "checkpoint %s has no data state for step %d; trying the previous checkpoint",
                    self.directory / str(step),
                    step,
                )
                self._move_aside(step)
                continue
            return step, state, data_state
        if steps:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} (tried steps {steps}); "
                f"the damaged ones were moved aside as <step>.corrupt"
            )
        return None, None, None

    def _move_aside(self, step: int) -> None:
        """Renames a damaged checkpoint out of Orbax's sight, so that a later save of the same
        step number does not collide with it and no resume picks it again."""
        self.wait()
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.corrupt"
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mmv: checkpoint {step} moved aside")
        self.manager.reload()

    def delete(self, step: int) -> None:
        self.wait()
        self.manager.delete(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _grain_state(folder) -> dict | None:
    """The data state of a checkpoint from before ``data_state``: Grain's handler wrote one JSON
    per process (``process_I-of-N.json``) with per-process bad-file counters; their sums are the
    global state."""
    files = sorted(folder.glob("process_*-of-*.json")) if folder.exists() else []
    if not files:
        return None
    states = [json.loads(f.read_text()) for f in files]
    return dict(
        step=int(states[0]["step"]),
        bad_files=sum(int(s["bad_files"]) for s in states),
        tried=sum(int(s["tried"]) for s in states),
    )


def abstract_of(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def load_params(path, abstract_params, step: int | None = None):
    """Params of another run (``init_from``, ``mmv-embed``): a run workdir or its ``checkpoints``
    folder, at ``step`` (default the latest). Raises ``FileNotFoundError`` naming the path when
    nothing (or not that step) is there."""
    path = paths.resolve(path)
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            mgr = ocp.CheckpointManager(directory)
            if step is not None and step not in mgr.all_steps():
                steps = sorted(mgr.all_steps())
                mgr.close()
                if steps:
                    raise FileNotFoundError(
                        f"{str(path)!r}: no checkpoint at step {step} (steps there: {steps})"
                    )
                continue
            step = mgr.latest_step() if step is None else step
            if step is not None:
                try:
                    restored = mgr.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.PyTreeRestore(
                                item={"params": abstract_params},
                                restore_args=ocp.checkpoint_utils.construct_restore_args(
                                    {"params": abstract_params}
                                ),
                                partial_restore=True,
                            )
                        ),
                    )
                except Exception as e:  # a damaged or foreign folder: name it, not a traceback
                    raise CheckpointError(
                        f"{directory / str(step)}: cannot be read as a "
                        f"checkpoint ({type(e).__name__})"
                    ) from None
                finally:
                    mgr.close()
                log.info("init_from %s (step %d)", directory, step)
                return restored["state"]["params"]
            mgr.close()
    raise FileNotFoundError(f"{str(path)!r}: no Orbax checkpoint found there")
