"""Output folders: a script never writes into another run's folder, and a training run owns its own.

The rule for every script that writes results (`claim_output_folder`): a folder that holds a
training run (train.py) or a classifier (classify.py) is written to only by the script that made it
— and by evaluate.py and export.py when it is the folder of the model they read, where their
reports belong. A folder of other results (inference, feature maps, evaluation reports, exports)
takes any of them: their file names are their own. The folder of the inputs is refused, and so is
a place that cannot be written, before any work; temporary files that killed processes left there
are deleted.

On top of that, a training run and a classifier lock their folder (`lock_run_folder`), and a
training run keeps its files apart from other training runs' (`claim_run_folder`):

- A lock (a POSIX `lockf` lock on `<folder>/.lock`) keeps a second run out while one is working
  there. The kernel drops it when the process dies, so a killed run never leaves the folder
  blocked; unlike `flock`, it belongs to the process and not to the open file, so DataLoader
  workers forked from a run killed with -9 do not keep holding it while they wind down.
- A folder that already holds a run is refused unless the new run continues it (`--resume` of
  a checkpoint inside it) or starts over (`--exist-ok`, which deletes the old run's files first,
  so nothing stale, e.g. a `best_model_iou.pth` of an older run, can be mistaken for this run's).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from dinokit.errors import UserError
from dinokit.writing import remove_stale_temp_files, temp_path

try:
    import fcntl
except ImportError:  # Windows: no lockf; runs are then not guarded against each other
    fcntl = None

# Everything train.py writes into a run folder.
RUN_FILES = (
    "last.pth",
    "best_model_loss.pth",
    "best_model_iou.pth",
    "final_model.pth",
    "metrics.csv",
    "best_validation.json",
    "test_metrics.json",
    "loss.png",
    "accuracy.png",
    "miou.png",
    "tensorboard",
)  # a folder (--tensorboard)
# test_metrics.json: the name of best_validation.json before it was computed at original resolution
LOCK_NAME = ".lock"

# Everything classify.py writes into its folder; the embedding caches are kept across reruns.
CLASSIFIER_CACHES = ("embeddings_train.pt", "embeddings_val.pt")
CLASSIFIER_RESULTS = (
    "classifier.pth",
    "split.json",
    "metrics.json",
    "metrics.csv",
    "loss.png",
    "accuracy.png",
    "confusion_knn.png",
    "confusion_linear.png",
    "neighbours.png",
    "predictions.csv",
)

# Everything pretrain.py writes into its run folder; a folder holding one of PRETRAIN_MARKS is
# one (pretrain.py writes backbone.pth before its first last.pth, so last.pth alone is train.py's).
PRETRAIN_FILES = ("last.pth", "backbone.pth", "student.pth", "metrics.csv", "loss.png", "knn.png", "tensorboard")
PRETRAIN_MARKS = ("backbone.pth", "student.pth", "knn.png")

# The runs that own their folder, by the files that show them (checked in this order); those
# every kind writes show only that one of them is there.
RUN_KINDS = {
    "pretraining run": PRETRAIN_MARKS,
    "training run": RUN_FILES,
    "classifier": (*CLASSIFIER_RESULTS, *CLASSIFIER_CACHES),
}
SHARED_RUN_FILES = ("metrics.csv", "loss.png", "accuracy.png")
RUN_NAMES = {
    "training run": "a training run (train.py)",
    "classifier": "a classifier (classify.py)",
    "pretraining run": "a pretraining run (pretrain.py)",
}
# What a run deletes with --exist-ok and refuses to mix with.
OWN_FILES = {"training run": RUN_FILES, "pretraining run": PRETRAIN_FILES}


class RunFolderError(UserError):
    """The output folder belongs to another run or kind of results, or cannot be written."""


def folder_run(folder: Path) -> tuple[str | None, list[str]]:
    """(run kind, the files that show it) of a folder: "training run", "classifier", "run" when only
    files both write are there, or None."""
    if not folder.is_dir():
        return None, []
    for kind, names in RUN_KINDS.items():
        found = [name for name in names if name not in SHARED_RUN_FILES and (folder / name).exists()]
        if found:
            return kind, found
    shared = [name for name in SHARED_RUN_FILES if (folder / name).exists()]
    return ("run", shared) if shared else (None, [])


def claim_output_folder(
    folder: str | Path,
    *,
    run: str | None = None,
    beside: str | Path | None = None,
    inputs: Iterable[str | Path] = (),
    flag: str = "--out-dir",
) -> Path:
    """Check `folder` by the rule in the module docstring before any work, and clean up after killed
    processes there. `run`: the kind of run this script is (its own folders are allowed); `beside`:
    the model file whose folder is always allowed (evaluate.py, export.py); `flag`: the option that
    chose the folder, named in the messages. A folder that did not exist is not left behind: the
    first result written creates it."""
    folder = Path(folder)
    inputs = [Path(p) for p in inputs]
    held = {p.resolve().parent for p in inputs if p.is_file()} | {p.resolve() for p in inputs if p.is_dir()}
    if folder.resolve() in held:
        raise RunFolderError(
            f"{flag} {folder}: is the folder of the inputs; results would be mixed with (and could "
            f"replace) them: choose another {flag}"
        )
    found, shown = folder_run(folder)
    own_model_folder = beside is not None and Path(beside).resolve().parent == folder.resolve()
    if found == "run" and run is not None:
        found = run  # only the files both runs write: the run's own checks decide
    if found is not None and found != run and not own_model_folder:
        what = RUN_NAMES.get(found, "the results of another run")
        raise RunFolderError(
            f"{folder}: holds {what}: {', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}; choose another {flag}"
        )
    check_writable(folder, keep=run is not None, flag=flag)
    for path in remove_stale_temp_files(folder):
        print(f"Removed {path.name}: a temporary file of a process that was killed")
    return folder


def check_writable(folder: Path, *, keep: bool, flag: str = "--out-dir") -> None:
    """Create `folder` and a file in it now, so that a read-only or mistyped place fails before the
    work; without `keep`, the folders this made are removed again."""
    missing = missing_folders(folder)
    created = missing[-1] if missing else None  # the outermost folder this makes
    blocking = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise RunFolderError(
            f"{folder}: cannot write there ({blocking} is a file, not a folder); choose another {flag}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp_path(folder / "write-check").unlink()
    except OSError as err:
        raise RunFolderError(f"{folder}: cannot write there ({err.strerror or err}); choose another {flag}") from err
    if created is not None and not keep:
        shutil.rmtree(created, ignore_errors=True)


class RunLock:
    """An exclusive, non-blocking lock on a folder, held until `release` or the process's death."""

    def __init__(self, folder: Path, name: str = LOCK_NAME):
        self.path = folder / name  # another name: a lock on one file of the folder (an index), not all of it
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
                raise RunFolderError(
                    f"{self.path.parent}: another run is using this folder ({owner}); "
                    "wait for it to finish or choose another --out-dir"
                ) from None
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


def claim_run_folder(
    folder: Path, *, resume: str | Path | None = None, exist_ok: bool = False, kind: str = "training run"
) -> RunLock:
    """Lock `folder` for this run (`kind`: a key of OWN_FILES), clean up after killed runs, and refuse
    another run's files."""
    lock = lock_run_folder(folder, kind)
    try:
        existing = [name for name in OWN_FILES[kind] if (folder / name).exists()]
        continuing = resume is not None and Path(resume).resolve().parent == folder.resolve()
        if existing and not continuing:
            if not exist_ok:
                raise RunFolderError(
                    f"{folder}: holds another run ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                    f"continue it with --resume {folder / 'last.pth'}, start over with --exist-ok "
                    "(its files are deleted), or choose another --out-dir"
                )
            for name in existing:
                path = folder / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"--exist-ok: deleted the previous run's {', '.join(existing)} in {folder}")
    except BaseException:
        lock.release()
        raise
    return lock


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first (what a run creates)."""
    return [p for p in [folder, *folder.parents] if not p.exists()]


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove those of `folders` (innermost first) that are empty: a run that failed before writing
    anything leaves no empty run folder behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): it stays, and so do its parents
            if folder.exists():
                return


def lock_run_folder(folder: Path, kind: str) -> RunLock:
    """`claim_output_folder`, then the run's lock on the folder (held until `release`)."""
    claim_output_folder(folder, run=kind)
    lock = RunLock(folder)
    lock.acquire()
    return lock
