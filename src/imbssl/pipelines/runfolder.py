"""The run folder: one process writes it at a time, it belongs to one config, and a failed attempt never blocks its
retry.

- A lock file (``.lock``, an flock) keeps a second process out. The kernel drops an flock when its
  holder dies, so the file a killed run leaves behind is stale and simply taken over.
- A folder whose config is saved but that holds no checkpoint (``*.pt``) has nothing to lose: a
  failed first attempt (wrong data.path, no GPU, a crash in epoch 1) is started afresh.
- ``--resume`` continues a folder's run with the same config; it may grow ``optim.epochs`` and change the settings
  that say where the run reads, writes and reports (``WHERE_NOT_WHAT``). A training run's config.yaml takes the new
  config only once its checkpoint has loaded (``save_run_config``), so a resume that fails before leaves it as it was.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, TypeVar

from pydantic import BaseModel

from imbssl.config import ConfigError, load_yaml, migrate_saved_config, save_config, validate_tree
from imbssl.engine.distributed import is_main, lost_connection, rank
from imbssl.engine.runlog import attach_file_log, file_log
from imbssl.errors import ImbsslError, Terminated, naming_the_file

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
#: the resolved config of a multi-stage pipeline, whose stages are run folders of their own
PIPELINE_CONFIG = "pipeline.yaml"
LOCK_FILE = ".lock"
#: the one key ``--resume`` may change, and only upwards; the schedules follow the new total (docs/reliability.md)
EXTENDABLE = "optim.epochs"
#: settings that say where a run reads, writes and reports, not what it computes: --resume may change them, and a
#: grid reuses a finished run whatever they say
WHERE_NOT_WHAT = ("data.cache_dir", "data.download", "train.device", "train.progress", "train.log_every",
                  "train.checkpoint_every", "train.checkpoint_every_s", "train.dist_timeout_s",
                  "train.prefetch_batches")
#: sections of such settings: where the run's logs go as well (W&B)
WHERE_NOT_WHAT_SECTIONS = ("train.wandb.",)

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class RunFolderBusy(ImbsslError, RuntimeError):
    """Another live process holds the run folder's lock."""


@contextmanager
def folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the block; raise RunFolderBusy, naming the holder, when another process has it."""
    path = run_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        _write_holder(fd, path)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so that a process waiting on this file sees it replaced
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(f"run folder {path.parent} is in use by {holder}; wait for it to finish or stop it")
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the current one
    return fd


def _write_holder(fd: int, path: Path) -> None:
    """Who holds the lock, for the message of a process it keeps out; on a full disk the first write that fails."""
    with naming_the_file(path):
        os.ftruncate(fd, 0)
        os.write(fd, f"imbssl process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%H:%M:%S')})"
                 .encode())


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the folder holds anything a retry could lose: a checkpoint, a backbone, a pipeline stage's output."""
    return any(run_dir.rglob("*.pt"))


def read_saved_config(path: Path, schema: type[ConfigT]) -> ConfigT:
    """A config that imbssl saved in a run folder, an older one migrated (config.migrate_method_section); an empty
    file is a truncated one, not the defaults."""
    return validate_tree(schema, migrate_saved_config(load_yaml(path, empty_ok=False)), origin=str(path))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unused_keys(config: BaseModel, prefix: str = "") -> set[str]:
    """The dotted keys of every section's ``unused_keys`` (a CNN's ViT sizes), nested sections included."""
    unused = {f"{prefix}{key}" for key in getattr(config, "unused_keys", set)()}
    for name in type(config).model_fields:
        if isinstance(value := getattr(config, name), BaseModel):
            unused |= _unused_keys(value, f"{prefix}{name}.")
    return unused


def changed_keys(old: BaseModel, new: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs, but for keys that neither config reads."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    unread = _unused_keys(old) & _unused_keys(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key) and key not in unread}


def where_not_what(key: str) -> bool:
    """Whether the dotted ``key`` (a pipeline's sits under ``base.``) is one of the ``WHERE_NOT_WHAT`` settings."""
    bare = key.removeprefix("base.")
    return bare in WHERE_NOT_WHAT or bare.startswith(WHERE_NOT_WHAT_SECTIONS)


def run_changes(old: BaseModel, new: BaseModel) -> dict[str, tuple[Any, Any]]:
    """``changed_keys`` but the ``WHERE_NOT_WHAT`` settings: those that make ``new`` another run than ``old``.

    ``train.precision: auto`` accepts the precision and layout a run was trained at (its config.yaml records what
    auto chose, and runs from before auto existed say fp32): such a run is resumed, and reused, as it is."""
    changed = {key: values for key, values in changed_keys(old, new).items() if not where_not_what(key)}
    for key, (_, wanted) in list(changed.items()):
        if key.endswith("train.precision") and wanted == "auto":
            del changed[key]
            changed.pop(key.removesuffix("precision") + "channels_last", None)
    return changed


def check_resumable(saved: BaseModel, cfg: BaseModel, path: Path) -> None:
    """Refuse any change but more epochs and ``WHERE_NOT_WHAT`` settings, naming each differing key."""
    changed = run_changes(saved, cfg)
    if moved := {key: values for key, values in changed_keys(saved, cfg).items() if key not in changed}:
        log.info("resuming with %s", _listed(moved))
    epochs = changed.get(EXTENDABLE)
    if epochs and epochs[1] > epochs[0]:
        del changed[EXTENDABLE]
    if changed:
        raise ConfigError(f"--resume with a config that differs from {path} in {_listed(changed)}; only "
                          f"{EXTENDABLE} may grow on resume, beside the settings of where the run reads, writes and "
                          f"reports (use another --run-dir for a different run)")
    if epochs:
        log.info("extending the run from %d to %d epochs; the learning-rate schedule is stretched over the new total",
                 *epochs)


def _listed(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changed.items())


def prepare_run_dir(cfg: BaseModel, run_dir: Path, resume: bool, config_file: str = RUN_CONFIG) -> None:
    """Save ``cfg`` in a new (or never checkpointed) folder; otherwise check that ``--resume`` may continue it."""
    saved = run_dir / config_file
    if saved.exists() and has_checkpoint(run_dir):
        if not resume:
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it or pick "
                              f"another --run-dir")
        try:
            previous = read_saved_config(saved, type(cfg))
        except ConfigError as err:
            raise ConfigError(f"{err} (if you know the run's config, delete {saved} and resume with it)") from None
        check_resumable(previous, cfg, saved)
        # A training run's is saved once its checkpoint loads (save_run_config); processes that share a pipeline
        # folder only read it.
        if config_file == RUN_CONFIG or previous == cfg:
            return
    elif saved.exists():
        log.info("%s holds no checkpoint: starting it afresh", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


def save_run_config(cfg: BaseModel, run_dir: Path) -> None:
    """Save a resumed training run's config, once its checkpoint has loaded: a resume refused by the checkpoint (a
    corrupt one, another process count) leaves the config the run was trained with, and its command still works."""
    if is_main():
        save_config(cfg, run_dir / RUN_CONFIG)


@contextmanager
def run_folder(cfg: BaseModel, run_dir: Path, resume: bool, config_file: str = RUN_CONFIG) -> Iterator[Path]:
    """Lock (a training run's folder), check or save the config, and copy the package's log records to train.log.

    A pipeline folder (its own ``config_file``) is shared by the processes that train its stages, each of
    which locks its stage's folder instead. In data-parallel training rank 0 alone holds and writes the folder.
    """
    if not is_main():
        try:
            yield run_dir
        except BaseException as err:
            if rank() == 1 and (isinstance(err, KeyboardInterrupt) or lost_connection(err)):
                _note_stop_of_rank_1(run_dir, err)  # rank 0, which keeps train.log, may be the process that died
            raise
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir) if config_file == RUN_CONFIG else nullcontext():
        prepare_run_dir(cfg, run_dir, resume, config_file)
        handler = attach_file_log(run_dir)
        try:
            yield run_dir
        except BaseException as err:
            _record_failure(handler, err)
            raise
        finally:
            logging.getLogger("imbssl").removeHandler(handler)
            handler.close()


def _record_failure(handler: logging.Handler, err: BaseException, who: str = "") -> None:
    """Why the run stopped, in train.log only: the console gets the command's own one-line message."""
    handler.handle(logging.makeLogRecord({"name": "imbssl", "levelno": logging.ERROR, "levelname": "ERROR",
                                          "msg": f"{who}run {_stop_reason(err)}"}))


def _stop_reason(err: BaseException) -> str:
    if isinstance(err, Terminated):
        return "terminated (SIGTERM)"
    if lost := lost_connection(err):  # gloo's own message is a source line and advice for another audience
        return f"stopped: another process of this torchrun job stopped ({lost})"
    return "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}: {err}"


def _note_stop_of_rank_1(run_dir: Path, err: BaseException) -> None:
    """Rank 1's line in train.log on a signal or a lost process: the only one when rank 0 was killed."""
    handler = file_log(run_dir)
    try:
        _record_failure(handler, err, who="rank 1: ")
    finally:
        handler.close()
