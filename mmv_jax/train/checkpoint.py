"""Orbax checkpoints: train state (model, optimizer, step, RNG) and the data iterator's state.

Saves are asynchronous; Orbax writes each step into a temporary folder and renames it only once
complete, so a crash while saving never touches the last good checkpoint (an unfinished one is
ignored on restore). The train state is saved sharded and restores into any mesh (Orbax
reshards); the data state is one small JSON written by process 0 (``data_state``), the same for
every topology, so a checkpoint resumes on another process or device count.
"""
from __future__ import annotations

import json
import logging

import jax
import orbax.checkpoint as ocp

from mmv_jax import paths

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state) -> tuple:
        """``(state, data_state)``: the state in ``abstract_state``'s shapes and shardings, and the
        data iterator's state (``None`` when the checkpoint has none)."""
        step_dir = self.directory / str(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if (step_dir / "data_state").exists():
            items["data_state"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_state = out["data_state"] if "data_state" in items else _grain_state(step_dir / "data")
        return out["state"], data_state

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
    return dict(step=int(states[0]["step"]), bad_files=sum(int(s["bad_files"]) for s in states),
                tried=sum(int(s["tried"]) for s in states))


def abstract_of(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def load_params(path, abstract_params):
    """Params of another run (``init_from``): a run workdir, its ``checkpoints`` folder, or one
    step folder. Raises ``FileNotFoundError`` naming the path when nothing is there."""
    path = paths.resolve(path)
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
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
    raise FileNotFoundError(f"config.init_from={str(path)!r}: no Orbax checkpoint found there")
