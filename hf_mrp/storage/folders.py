"""Folders replaced whole: `swapped_folder` stages a folder's new files beside it and exchanges the two in one
atomic step (a reader, or a kill at any moment, sees the old files whole or the new ones whole), and
`sweep_stale_staging` removes the staging folders that killed runs left behind (this module's and
`files.staged_folder`'s)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

# files.exchange_paths is looked up through the module at each call (not imported by name): the tests' kill-at-a-
# boundary wrapper replaces it there
from . import files


def staging_sibling(folder: Path) -> Path:
    """The staging folder beside ``folder`` that `swapped_folder` fills (``.<name>.staging-<pid>``)."""
    return folder.parent / f".{folder.name}.staging-{os.getpid()}"


def _link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Hard-link every entry of ``source`` not in ``skip`` (and not already in ``target``) into ``target``."""
    for entry in source.iterdir():
        if entry.name in skip or (target / entry.name).exists() or ".staging-" in entry.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            (target / entry.name).mkdir()
            _link_tree(entry, target / entry.name, set())
        else:
            os.link(entry, target / entry.name, follow_symlinks=False)


@contextlib.contextmanager
def swapped_folder(folder: str | Path, replaced: Iterable[str] = (), last: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; when the block succeeds, it takes ``folder``'s place in one
    atomic exchange, so a reader (or a kill at any moment) sees the old files whole or the new files whole.

    The entries of the old folder that the block did not write and that are not in ``replaced`` (files an earlier
    writer of the same kind may have left, which must not outlive it) are carried over as hard links first, the
    folder's lock file too (its inode holds the lock). Where the filesystem cannot exchange two paths, the files
    are moved one by one instead, ``last`` last. A failure removes the staging folder; the old folder stays."""
    folder = Path(folder).resolve()
    staging = staging_sibling(folder)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd().resolve()
    holds_cwd = cwd == folder or folder in cwd.parents  # exchanged away, the current folder would be deleted
    try:
        yield staging
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copymode(folder, staging)  # the exchanged-in folder keeps the old one's permissions
        _link_tree(folder, staging, set(replaced))
        if holds_cwd or not files.exchange_paths(staging, folder):
            _move_files(staging, folder, last, set(replaced))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the exchange: the old files


def _move_files(staging: Path, folder: Path, last: str | None, replaced: set[str]) -> None:
    """The fallback of swapped_folder: stale ``replaced`` files out, then each new file in (``last`` last)."""
    written = {p.name for p in staging.iterdir()}
    for name in replaced - written:
        (folder / name).unlink(missing_ok=True)
    for path in sorted(staging.rglob("*"), key=lambda p: (p.name == last, str(p))):
        if path.is_file() and not path.is_symlink():
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not (target.exists() and os.path.samefile(path, target)):
                os.replace(path, target)


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_stale_staging(folder: str | Path) -> list[Path]:
    """Remove the staging folders of dead processes in and beside ``folder`` (``.staging-<pid>`` inside it, from
    `staged_folder`; ``.<name>.staging-<pid>`` beside it, and inside it for its subfolders, such as a refine run's
    audits, from `swapped_folder`); returns what was removed."""
    folder = Path(folder).resolve()
    beside = folder.parent.glob(f".{glob.escape(folder.name)}.staging-*")
    candidates = [*folder.glob(".staging-*"), *folder.glob(".*.staging-*"), *beside]
    removed = []
    for path in candidates:
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_is_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
