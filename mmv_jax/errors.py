"""The errors a user can act on. The launchers turn exactly these into one line and an exit
code; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key (``config.a.b``)."""


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. more bad files than ``data.max_bad_fraction``)."""


class DivergedError(RuntimeError):
    """The loss or gradients stayed non-finite for ``config.max_nonfinite_steps`` steps."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every error a launcher prints as one line: these three, and the typed errors of the
    manifest, the packer, the checkpoints and the run folder (imported here, on demand: they
    live beside the code that raises them)."""
    from mmv_jax.data.manifest import ManifestError
    from mmv_jax.data.packing import BucketError
    from mmv_jax.train.checkpoint import CheckpointError
    from mmv_jax.train.workdir import WorkdirBusy

    return (
        ConfigError,
        DataError,
        DivergedError,
        ManifestError,
        BucketError,
        CheckpointError,
        WorkdirBusy,
    )
