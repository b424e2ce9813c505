"""An indexed image collection on disk: one file holding the table of images (path, size, mtime),
their embeddings, the FAISS index over them, and the key of what made the embeddings.

The file is written whole to a temporary name and renamed (a run killed while writing leaves the
previous index usable), read back checked (a file cut short is named as such), and updated
incrementally: `plan_update` says which stored rows stay, which files are new or changed (size
or modification time) and must be embedded, and which were deleted.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import config
from dinokit.backbones.settings import moved_weights
from dinokit.backbones.weights_file import (
    WeightsChangedError,
    check_weights_unchanged,
    describe_identity,
    weights_identity,
)
from dinokit.data.file_kinds import file_kind, sniff, wrong_file
from dinokit.data.image_files import IMAGE_EXTENSIONS
from dinokit.errors import UserError
from dinokit.retrieval.vector_index import build_index, from_bytes, index_kind, search, to_bytes
from dinokit.writing import atomic_write
from model_config import canonical_name

FORMAT = 1
RETRIEVAL_DIR = config.OUTPUT_DIR / "retrieval"


def index_path(name: str | Path, suffix: str = ".index") -> Path:
    """--index NAME: outputs/retrieval/NAME.index (`index`'s file; suffix "" for `build`'s folder);
    a name with a folder or a suffix is a path."""
    path = Path(name)
    return path if path.suffix or path.parent != Path(".") else RETRIEVAL_DIR / f"{path}{suffix}"


class IndexFileError(UserError):
    """An index file that cannot be used as asked; the message names the fix."""


@dataclass(frozen=True)
class FileRecord:
    """An indexed image: where it is and what it was when embedded."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        stat = path.stat()
        return cls(str(path), stat.st_size, stat.st_mtime_ns)


def collect_images(folders: list[str | Path]) -> list[Path]:
    """Every image file under `folders` (recursively; hidden files and folders skipped), as
    absolute paths, sorted; a folder without any image is an error."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_file():
            found.append(folder.resolve())
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such file or folder")
        images = [
            path.resolve()
            for path in folder.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            and path.is_file()
        ]
        if not images:
            raise IndexFileError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
        found += images
    return sorted(set(found))


@dataclass
class UpdatePlan:
    """What bringing an index up to date with the files on disk takes."""

    keep: list[int]  # stored rows whose file is unchanged
    embed: list[Path]  # new or changed files
    removed: list[str]  # stored files deleted from disk
    changed: set[str] = field(default_factory=set)  # of `embed`, the files that were stored before
    now: dict[str, FileRecord] = field(default_factory=dict)  # every file as it was found, before embedding
    dropped: list[str] = field(default_factory=list)  # stored files still on disk but no longer indexed (--replace)


def plan_update(stored: list[FileRecord], files: list[Path], *, replace: bool = False) -> UpdatePlan:
    """Compare the stored table with `files`, the images now under the folders given. The stored
    images outside those folders stay in the index (checked for changes like the rest) unless
    `replace`: then they are dropped. "Removed" are the stored files deleted from disk."""
    files = list(files)
    if not replace:
        given = set(map(str, files))
        files += [Path(r.path) for r in stored if r.path not in given and Path(r.path).is_file()]
    now = {str(path): FileRecord.of(path) for path in files}
    by_path = {record.path: row for row, record in enumerate(stored)}
    keep = [by_path[p] for p, record in now.items() if p in by_path and stored[by_path[p]] == record]
    kept = {stored[row].path for row in keep}
    embed = [Path(p) for p in now if p not in kept]
    gone = [record.path for record in stored if record.path not in now]
    removed = [path for path in gone if not Path(path).exists()]
    dropped = [path for path in gone if Path(path).exists()]
    changed = {str(p) for p in embed if str(p) in by_path}
    return UpdatePlan(keep, embed, removed, changed=changed, now=now, dropped=dropped)


@dataclass
class Collection:
    """The table, the embeddings (normalised rows, float32) and the FAISS index over them."""

    key: dict[str, Any]  # what the embeddings depend on: backbone, image size, embedding kind
    records: list[FileRecord] = field(default_factory=list)
    vectors: np.ndarray | None = None
    index: Any = None
    recall: float = 1.0  # recall@10 of the index against exact search, measured when built
    folders: list[str] = field(default_factory=list)  # the folders (or files) given to `index`, absolute

    def indexed_folders(self) -> list[Path]:
        """The folders the images were found in (those given to `index`; for an index written before
        they were stored: the images' own folders)."""
        given = [Path(p) for p in self.folders] or [Path(r.path).parent for r in self.records]
        return sorted({p if p.is_dir() or not p.suffix else p.parent for p in given})

    def refresh_command(self, path: Path) -> str:
        """The command that brings this index up to date with the disk."""
        folders = " ".join(str(p) for p in self.indexed_folders()) or "DIR"
        return f"python retrieve.py index --images {folders} --index {path}"

    def rebuild_command(self, path: Path, flags: str) -> str:
        """The command that embeds every image again with `flags`."""
        return f"{self.refresh_command(path)} {flags} --rebuild"

    def check_weights(self, path: Path, given: str | None = None) -> None:
        """Refuse to embed queries with other weights than the vectors were made by (`checked_key`)."""
        self.key = checked_key(self.key, path, given, lambda flags: self.rebuild_command(path, flags))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) `[Q, k]`, best first (row -1: fewer than k stored)."""
        return search(self.index, vectors, k)

    def path_of(self, row: int) -> str:
        return self.records[row].path

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def missing_files(self, paths: list[str]) -> list[str]:
        """Of indexed `paths`, those no longer on disk (the index is stale)."""
        return [p for p in paths if not Path(p).is_file()]

    @property
    def kind(self) -> str:
        return index_kind(self.index) if self.index is not None else "exact"

    def rebuild(self, kind: str) -> None:
        self.index = build_index(self.vectors, kind)

    def save(self, path: Path) -> None:
        """Write the whole collection to `path` atomically (a temporary file, renamed)."""
        table = {
            "format": FORMAT,
            "key": self.key,
            "recall": self.recall,
            "folders": self.folders,
            "files": [[r.path, r.size, r.mtime_ns] for r in self.records],
        }
        arrays = {
            "table": np.frombuffer(json.dumps(table).encode(), dtype=np.uint8),
            "vectors": self.vectors,
            "index": to_bytes(self.index),
        }
        atomic_write(path, lambda tmp: _save_npz(tmp, arrays))

    @classmethod
    def load(cls, path: Path) -> Collection:
        """Read a collection `save` wrote; a missing, foreign or cut-short file is a one-line error."""
        if not path.is_file():
            raise IndexFileError(f"{path}: no such index; build it with: python retrieve.py index --images DIR ...")
        kind = sniff(path)
        if kind not in ("retrieval index", "damaged zip"):  # a damaged one is named "cut short" below
            raise wrong_file(path, file_kind(path), "a retrieve.py index")
        try:
            with np.load(path, allow_pickle=False) as data:
                table = json.loads(bytes(data["table"]).decode())
                vectors, index = np.array(data["vectors"]), from_bytes(data["index"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, RuntimeError) as err:
            raise IndexFileError(
                f"{path}: not a readable index file (cut short or another kind of file: {type(err).__name__}); "
                "rebuild it with: python retrieve.py index --images DIR ... --index NAME"
            ) from err
        if table.get("format") != FORMAT:
            raise IndexFileError(f"{path}: index format {table.get('format')!r}, this version reads {FORMAT}")
        records = [FileRecord(p, size, mtime) for p, size, mtime in table["files"]]
        return cls(table["key"], records, vectors, index, table.get("recall", 1.0), table.get("folders", []))


def checked_key(key: dict[str, Any], path: Path, given: str | None, rebuild: Callable[[str], str]) -> dict[str, Any]:
    """Refuse to embed queries for the vectors at `path` with other weights than they were made by:
    the stored weights file is checked by content (dinokit/backbones/weights_file.py); a `given`
    --weights FILE with the same content replaces the stored path (a moved copy). Returns the key
    with the weights file as found now; `rebuild(flags)` is the command that re-embeds with `flags`."""
    backbone = key["backbone"]
    stored = backbone.get("weights_file") or {}
    if given is not None:
        asked = weights_identity(given)
        if asked["sha256"] != stored.get("sha256"):
            was = describe_identity(stored) if "sha256" in stored else backbone.get("weights") or "no weights file"
            raise WeightsChangedError(
                f"--weights {given}: not the weights {path} was embedded with ({was}); give that file, "
                f"or re-embed with these weights: {rebuild(f'--weights {given}')}"
            )
        return {**key, "backbone": {**backbone, "weights": asked["path"], "weights_file": asked}}
    if "sha256" in stored:
        found = moved_weights(stored, canonical_name(backbone["backbone"], backbone.get("registers", False)))
        check_weights_unchanged(found, f"{path} was embedded", rebuild(describe_key(key)))
        return {**key, "backbone": {**backbone, "weights": found["path"], "weights_file": found}}
    return key


def describe_key(key: dict[str, Any]) -> str:
    """The flags that rebuild an index with `key`'s embeddings."""
    backbone = key["backbone"]
    flags = f"--backbone {backbone['backbone']} --imgsz {key['imgsz']} --features {key['features']}"
    if key["scales"] != [1.0]:
        flags += " --scales " + " ".join(f"{s:g}" for s in key["scales"])
    if backbone.get("weights"):
        flags += f" --weights {backbone['weights']}"
    return flags + ("" if backbone["pretrained"] else " --no-pretrained")


def backbone_name(backbone: dict[str, Any]) -> str:
    """The canonical name of a key's backbone (`small` is `dinov2_vits14`); vectors made elsewhere
    (write_vector_shards) keep whatever name their key gives."""
    try:
        return canonical_name(backbone.get("backbone", "unknown"), backbone.get("registers", False))
    except ValueError:
        return str(backbone.get("backbone", "unknown"))


def key_differences(stored: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """What differs between two embedding keys, one 'setting: stored -> asked' each; none when they
    make the same embeddings (a weights file is compared by content: a moved copy is the same)."""

    def same_content(one: dict[str, Any], other: dict[str, Any]) -> bool:
        sha = (one.get("weights_file") or {}).get("sha256")
        return sha is not None and sha == (other.get("weights_file") or {}).get("sha256")

    def weights(backbone: dict[str, Any]) -> str:
        file = backbone.get("weights_file") or {}
        if "sha256" in file:
            return describe_identity(file)
        if backbone.get("weights"):
            return f"{backbone['weights']} (recorded by size and time only: an index of an older version)"
        if not backbone.get("pretrained", True):
            return f"none (random init, seed {backbone.get('seed')})"
        return "none (the source's own)"

    differences = []
    named = [backbone_name(key["backbone"]) for key in (stored, asked)]
    if named[0] != named[1]:  # `small` and `dinov2_vits14` are one backbone
        differences.append(f"backbone {named[0]} -> {named[1]}")
    for name in ("source", "pretrained"):
        if stored["backbone"].get(name) != asked["backbone"].get(name):
            differences.append(f"{name} {stored['backbone'].get(name)} -> {asked['backbone'].get(name)}")
    if not same_content(stored["backbone"], asked["backbone"]) and weights(stored["backbone"]) != weights(
        asked["backbone"]
    ):
        differences.append(f"weights {weights(stored['backbone'])} -> {weights(asked['backbone'])}")
    for name in ("imgsz", "crop_pct", "features", "scales", "format"):
        if stored.get(name) != asked.get(name):
            differences.append(f"{name} {stored.get(name)} -> {asked.get(name)}")
    unlisted = ("hub_dir", "seed")  # what else a backbone's identity holds
    if not differences and any(stored["backbone"].get(k) != asked["backbone"].get(k) for k in unlisted):
        differences.append("the backbone's settings (--hub-dir or --seed)")
    return differences


def _save_npz(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as handle:  # a file object: numpy would otherwise append ".npz" to the name
        np.savez(handle, **arrays)
