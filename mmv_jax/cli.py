"""The command lines' argument parser: a bad argument is one line on stderr and exit 2; so is a
user error a ``main`` catches (:func:`fail`)."""

from __future__ import annotations

import argparse
import functools
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (argparse prints the whole usage
    first), naming the command and where the usage is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(prog: str, message) -> int:
    """Prints ``prog: message`` as one line on stderr; returns the exit code (2) for ``main``."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def command(prog: str, *errors: type[Exception]):
    """Decorates a command's ``main(argv)``: the ``errors`` it raises are one line on stderr
    (:func:`fail`) and exit code 2; anything else keeps its traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except errors as e:
                return fail(prog, e)

        return run

    return wrap


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (a run folder or ``RUN/checkpoints/N``) and ``--step``, as every command
    that reads a trained encoder spells them (resolved by ``mmv_jax.api.resolve_checkpoint``)."""
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="run folder written by mmv-train, or one of its checkpoints (RUN/checkpoints/N)",
    )
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
