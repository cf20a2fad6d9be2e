"""Owned output folders: one run at a time writes into a folder.

A run holds an exclusive ``fcntl.flock`` on ``<folder>/.hf_mrp.lock`` for its lifetime; the file
names the holder (pid, host, command, start time) so a second run into the folder stops at once with
one line that says who owns it. The kernel drops the lock when the holder exits, however it exits
(a killed run never leaves a stale lock). The lock file is a dotfile, so Hub pushes skip it. Taking the lock
also sweeps the staging folders that killed runs left in and beside the folder (folders.sweep_stale_staging).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MRPUserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf_mrp.lock"
_HELD: dict[str, int] = {}  # folders this process holds -> nesting depth (the CLI locks before refine() does)


def redacted(command: str) -> str:
    """The command with the value of every --*token* flag replaced by '***' (the lock file is readable by others)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command.split(" ", 1)[0]
    hide_next = False
    for index, word in enumerate(words):
        flag = word.split("=", 1)[0]
        if hide_next:
            words[index], hide_next = "***", False
        elif flag.startswith("-") and "token" in flag.lower():
            if "=" in word:
                words[index] = f"{flag}=***"
            else:
                hide_next = True
    return shlex.join(words)


def current_command() -> str:
    """The command line of this process, as a user would type it again (tokens hidden)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("hf-mrp", "cli.py")):
        argv[0] = "hf-mrp"
    return redacted(shlex.join(argv)) if argv else "python"


def _holder(handle, patience: float = 2.0) -> str:
    """Who holds the lock, from what the holder writes into the lock file right after taking it (waiting
    up to ``patience`` seconds for a holder that has just taken it)."""
    record: dict[str, Any] = {}
    deadline = time.monotonic() + patience
    while not record and time.monotonic() < deadline:
        try:
            handle.seek(0)
            record = json.loads(handle.read() or "{}")
        except (OSError, ValueError):
            record = {}
        if not record:
            time.sleep(0.05)
    if not record:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')} since {started}: {record.get('command')}"


@contextlib.contextmanager
def owned_folder(folder: str | Path, command: str | None = None, active: bool = True) -> Iterator[Path]:
    """Hold the folder's lock while the block runs; a second holder is refused with one line.

    ``active=False`` (processes other than the main one of a distributed run) takes no lock. A folder
    this process already holds is entered again without a second lock (flock would refuse it). A folder that holds
    nothing but the lock file when the block ends (a command refused before any work) keeps nothing of the run:
    the lock file goes, and so does the folder (and any parent) when this call created it.
    """
    from .files import ensure_output_dir

    created = _first_missing(Path(folder)) if isinstance(folder, (str, Path)) else None
    folder = ensure_output_dir(folder)
    key = str(folder.resolve())
    if not active:
        yield folder
        return
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    handle = _locked_handle(folder, command)
    try:
        _HELD[key] = 1
        try:
            yield folder
        finally:
            del _HELD[key]
            _remove_if_unused(folder, created)
    finally:
        handle.close()  # closing the file releases the lock


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None: ``folder`` exists)."""
    missing = None
    for path in (folder, *folder.parents):
        try:
            if path.exists():
                return missing
        except (OSError, ValueError):  # a NUL byte, a name too long: ensure_output_dir names the problem
            return None
        missing = path
    return missing


def _locked_handle(folder: Path, command: str | None):
    """The lock file, opened, flocked and holding this run's record. A lock taken on a file that its last holder
    removed (``_remove_if_unused``) between our open and our flock is no lock: taken again on the file now there."""
    import fcntl

    from .files import ensure_output_dir
    from .folders import sweep_stale_staging

    for attempt in range(3):  # bounded: where inode numbers are not stable, the lock taken is kept
        ensure_output_dir(folder)  # again after a retry: the last holder may have removed it
        handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _holder(handle) if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) else None
            handle.close()
            if holder is None:
                raise
            raise MRPUserError(
                f"output_dir {folder} is in use by another run ({holder}); wait for it to finish, "
                f"or pass another --output_dir"
            ) from None
        if attempt == 2 or _is_same_file(handle, folder / LOCK_FILE):
            break
        handle.close()
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": redacted(command) if command else current_command(),
        "started": time.time(),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record))
    handle.flush()
    for stale in sweep_stale_staging(folder):  # left by a run that was killed (SIGKILL, power loss)
        logger.warning("removed %s, the staging folder of a run that was killed before it finished", stale)
    return handle


def _is_same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _remove_if_unused(folder: Path, created: Path | None) -> None:
    """Still holding the lock: a folder with nothing but the lock file loses it, and the folders this run created
    (``created`` and those below it, down to ``folder``) go while empty."""
    try:
        if [entry.name for entry in folder.iterdir()] != [LOCK_FILE]:
            return
        (folder / LOCK_FILE).unlink()
        if created is None:
            return
        for path in (folder, *folder.parents):
            path.rmdir()
            if path == created:
                return
    except OSError:  # another process wrote into it meanwhile: it keeps what it holds
        return


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun and accelerate set RANK), or a process launched alone:
    the one process of a run that takes the lock."""
    return os.environ.get("RANK", "0") == "0"
