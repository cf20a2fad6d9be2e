"""Atomic writes: a file appears whole (temp file + rename) or not at all, so an interrupted run
never leaves a half-written report that a later command would read. Reading back names the file that is missing
or damaged; `exchange_paths` swaps two paths in one step. A folder replaced whole (its new files staged beside it,
then exchanged) is `folders.py`'s."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hf_mrp.compat import quotes_no_space  # absolute: this module may move


def current_umask() -> int:
    """The process' umask, read without changing it where Linux shows it (/proc/self/status): os.umask can only
    read it by setting it, and a file another thread creates in between (an event file, a push's staging) would
    get the wrong mode. Elsewhere: set and set back at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_default_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file or folder made by tempfile (0600 / 0700: private) the mode open() / mkdir() would have given
    it, so a report or a cached model another user of a shared machine reads is readable as usual."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    If the block raises, neither ``path`` (when it did not exist; an old version stays untouched)
    nor the temporary file remains. os.replace is atomic within a filesystem, and the temporary
    file lives in the same folder, so a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    with_default_mode(temporary)
    try:
        try:
            yield Path(temporary)
        except Exception as error:
            if is_no_space(error):
                written = os.path.getsize(temporary) if os.path.exists(temporary) else 0
                raise no_space_error(path, f"writing {path.name}", None, written) from None
            raise
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def is_no_space(error: BaseException) -> bool:
    """A full disk, as an OSError (ENOSPC) or as a writer's own error type that quotes it (safetensors)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return quotes_no_space(error)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count:,} bytes"


def no_space_error(target: Path, doing: str, needed: int | None, written: int = 0):
    """One line: what was being written, how much it needs, how much is free, and that nothing was replaced."""
    from ..errors import MRPUserError

    folder = target if target.is_dir() else target.parent
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    need = f"it needs about {_megabytes(needed)}" if needed else f"it needs more than the {_megabytes(written)} written"
    return MRPUserError(
        f"no space left on device while {doing} in {folder}: {need} and {_megabytes(free)} is free; nothing was "
        f"replaced (earlier files are as they were, no partial file is left); free some space and run again"
    )


@contextlib.contextmanager
def staged_folder(folder: str | Path, doing: str = "saving", needed: int | None = None) -> Iterator[Path]:
    """Yield an empty staging folder inside ``folder`` for a writer that writes several files (save_pretrained);
    when the block succeeds, move each file onto ``folder`` (os.replace: every file appears whole).

    If the block fails (a full disk, a crash of the writer), the staging folder is deleted and ``folder``
    is as it was: the previous files or none, never a partial one. A full disk is one line that says how
    much space ``needed`` (bytes, an estimate) was."""
    folder = Path(folder)
    staging = folder / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            yield staging
        except Exception as error:
            if is_no_space(error):
                written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
                raise no_space_error(folder, doing, needed, written) from None
            raise
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the system or the
    filesystem cannot (nothing was changed then)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Indented JSON with NaN/inf written as null (strict JSON readers reject NaN)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(temporary_path)`` (numpy, parquet, matplotlib...)."""
    with atomic_path(path) as temporary:
        writer(temporary)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    write_with(path, save)


def write_parquet(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: np.asarray(values) for name, values in columns.items()})
    write_with(path, lambda temporary: pq.write_table(table, temporary))


def _unreadable(path: Path, error: Exception) -> Exception:
    from ..errors import MRPUserError

    reason = (
        "it is missing"
        if isinstance(error, FileNotFoundError)
        else f"{type(error).__name__}: " + (str(error).strip().splitlines()[0] if str(error).strip() else "unreadable")
    )
    return MRPUserError(
        f"cannot read {path} ({reason}); the folder is incomplete or was changed by hand: write it again "
        "(rerun the command that made it) or pass another folder"
    )


def read_parquet(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a parquet file; a missing or damaged file is an MRPUserError that names it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise _unreadable(path, error) from error
    return {name: table.column(name).to_numpy() for name in table.column_names}


def read_npy(path: str | Path) -> np.ndarray:
    """An array saved by `write_npy` (never a pickle); a missing or damaged file is an MRPUserError."""
    path = Path(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _unreadable(path, error) from error


def read_json(path: str | Path) -> Any:
    """Parsed JSON; a missing file or invalid JSON is an MRPUserError that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(path, error) from error


def ensure_output_dir(path: str | Path) -> Path:
    """Create ``path`` as a writable folder, or fail with a message that says what to change."""
    from ..errors import MRPUserError

    path = _checked_output_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as error:
        raise MRPUserError(f"cannot write to output_dir {path} ({error.strerror}); pass a writable folder") from error
    return path


def check_output_dir(path: str | Path) -> Path:
    """ensure_output_dir's checks of ``path`` without creating it, for a folder that appears whole later (staged
    beside it, folders.swapped_folder): only its parent is created and probed for writing."""
    path = _checked_output_path(path)
    ensure_output_dir(path.parent)
    return path


def _checked_output_path(path: str | Path) -> Path:
    """``path`` as a Path, refused in one line when it cannot be a folder (empty, a NUL byte, a file, below a file)."""
    from ..errors import MRPUserError

    if path is None or not str(path).strip():
        raise MRPUserError(f'output_dir is empty ({str(path)!r}); pass a folder path ("." for the current folder)')
    if "\0" in str(path):
        raise MRPUserError(f"output_dir {str(path)!r} holds a NUL byte; pass a folder path")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MRPUserError(f"output_dir {path} is a file; pass a folder path")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise MRPUserError(f"cannot create output_dir {path}: {blocking} is a file, not a folder; pass a folder path")
    return path
