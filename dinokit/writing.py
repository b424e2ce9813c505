"""The one file-writing rule: atomic replacement, temporary names that say whose they are (and the
cleanup of a killed process's leftovers), strict JSON.

A crash, kill -9 or full disk must never leave half a file where a whole one was expected;
and what a killed process left behind must be recognisable as such, to be cleaned up later."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)  # read once: temporary files get the permissions a plain open() would give
os.umask(_UMASK)

TEMP_MARK = ".tmp-"  # .<name>.tmp-<host>-<pid>-<random>[suffix]: whose it is, so leftovers can be told apart


_TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]{8}(\.\w+)?$")


def temp_path(path: str | Path, suffix: str = "", directory: bool = False) -> Path:
    """A new hidden file (or folder) beside `path`, named after this host and process, so that
    `remove_stale_temp_files` can tell a killed process's leftovers from a live one's. It has the
    permissions a plain open() (or mkdir) would give: it becomes the result when renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        return Path(tmp)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600
    return Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that processes of this host left behind when killed (kill -9, power
    loss) in `folder`: ours by name, and only those whose process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class WriteError(OSError):
    """A result that could not be written; the message names the file and the reason."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`: a crash leaves the old file, never half a new one.

    Every result file goes through here, so a failed write (a full disk, a read-only folder) is
    always the same one-line error naming `path`, with the temporary file removed."""
    path = Path(path)
    try:
        tmp = temp_path(path)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except WriteError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(path: Path, err: OSError) -> WriteError:
    """`path: could not be written (No space left on device)`, and whether an earlier file survives."""
    previous = "; the previous file is unchanged" if path.exists() else ""
    error = WriteError(f"{path}: could not be written ({err.strerror or err}){previous}")
    error.errno = err.errno
    return error


def json_ready(value: Any) -> Any:
    """`value` with every nan/inf float as None: JSON has no NaN (Python would write a bare `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Atomically write `value` as strict JSON (nan -> null)."""
    text = json.dumps(json_ready(value), indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """`atomic_write` for a folder of files that belong together (an index and its id table): written
    into a temporary folder beside `path`, then swapped in by two renames; the folder `path` held
    before is removed only once the new one is in place. A failed or killed write leaves the old one."""
    path = Path(path)
    try:
        staging = temp_path(path, directory=True)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        write(staging)
        if path.exists():
            old = temp_path(path, directory=True)
            os.replace(path, old)  # `old` was an empty folder: replaced by the previous one
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise err if isinstance(err, WriteError) else write_error(path, err) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
