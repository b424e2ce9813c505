"""A training run owns its output folder: one run at a time, never another run's files.

- A lock (a POSIX `lockf` lock on `<folder>/.lock`) keeps a second run out while one is working
  there. The kernel drops it when the process dies, so a killed run never leaves the folder
  blocked; unlike `flock`, it belongs to the process and not to the open file, so DataLoader
  workers forked from a run killed with -9 do not keep holding it while they wind down.
- A folder that already holds a run is refused unless the new run continues it (`--resume` of
  a checkpoint inside it) or starts over (`--exist-ok`, which deletes the old run's files first,
  so nothing stale, e.g. a `best_model_iou.pth` of an older run, can be mistaken for this run's).
- Temporary files that killed processes left behind are deleted on start.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path

from cli import UserError
from files import remove_stale_temp_files

try:
    import fcntl
except ImportError:  # Windows: no lockf; runs are then not guarded against each other
    fcntl = None

# Everything train.py writes into a run folder.
RUN_FILES = ("last.pth", "best_model_loss.pth", "best_model_iou.pth", "final_model.pth", "metrics.csv",
             "best_validation.json", "test_metrics.json", "loss.png", "accuracy.png", "miou.png",
             "tensorboard")  # a folder (--tensorboard)
# test_metrics.json: the name of best_validation.json before it was computed at original resolution
LOCK_NAME = ".lock"


class RunFolderError(UserError):
    """The output folder belongs to another run."""


class RunLock:
    """An exclusive, non-blocking lock on a folder, held until `release` or the process's death."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.handle = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise RunFolderError(f"{self.path.parent}: another training run is using this folder ({owner}); "
                                     "wait for it to finish or choose another --out-dir") from None
            try:  # the previous holder may have deleted the file between our open and our lock
                if os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can lock a file about to vanish
            self.handle.close()
            self.handle = None


def claim_run_folder(folder: Path, *, resume: str | Path | None = None, exist_ok: bool = False) -> RunLock:
    """Lock `folder` for this run, clean up after killed runs, and refuse another run's files."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    lock.acquire()
    try:
        for path in remove_stale_temp_files(folder):
            print(f"Removed {path.name}: a temporary file of a run that was killed")
        existing = [name for name in RUN_FILES if (folder / name).exists()]
        continuing = resume is not None and Path(resume).resolve().parent == folder.resolve()
        if existing and not continuing:
            if not exist_ok:
                raise RunFolderError(
                    f"{folder}: holds another run ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                    f"continue it with --resume {folder / 'last.pth'}, start over with --exist-ok "
                    "(its files are deleted), or choose another --out-dir")
            for name in existing:
                path = folder / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"--exist-ok: deleted the previous run's {', '.join(existing)} in {folder}")
    except BaseException:
        lock.release()
        raise
    return lock
