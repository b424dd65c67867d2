"""The base of imbssl's own errors: failures whose message is written for the user (the CLI prints it as is)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


class ImbsslError(Exception):
    """A run or command that cannot go on as asked; the message names the file, key or folder and the problem."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (SLURM pre-emption, Kubernetes eviction, ``timeout``, torchrun stopping its workers), stopped as
    Ctrl-C stops: the command's handler (cli.main) raises it, so every cleanup that Ctrl-C runs runs for it too."""


class ProcessLost(ImbsslError, RuntimeError):
    """Another process of a torchrun job died (its connection closed); the message says how to continue."""


@contextmanager
def naming_the_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError of writing ``path`` names it: a ``write`` or ``close`` that fails (a full disk) carries no file name,
    and the CLI's one line would not say which file it was."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, os.fspath(path)) from err
