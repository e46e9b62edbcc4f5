"""Orbax checkpoints: train state (model, optimizer, step, RNG) and the Grain iterator together.

Saves are asynchronous; Orbax writes each step into a temporary folder and renames it only once
complete, so a crash while saving never touches the last good checkpoint (an unfinished one is
ignored on restore).
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores into ``abstract_state``'s shapes and shardings; the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_of(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def load_params(path: str, abstract_params):
    """Params of another run (``init_from``): a run workdir, its ``checkpoints`` folder, or one
    step folder. Raises ``FileNotFoundError`` naming the path when nothing is there."""
    path = os.path.abspath(path)
    candidates = [os.path.join(path, "checkpoints"), path]
    for directory in candidates:
        if os.path.isdir(directory):
            mgr = ocp.CheckpointManager(directory)
            step = mgr.latest_step()
            if step is not None:
                restored = mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"params": abstract_params},
                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                            {"params": abstract_params}),
                        partial_restore=True)))
                mgr.close()
                log.info("init_from %s (step %d)", directory, step)
                return restored["state"]["params"]
            mgr.close()
    raise FileNotFoundError(f"config.init_from={path!r}: no Orbax checkpoint found there")
