"""Embeddings of a large collection as shards on disk, the layout clip-retrieval made common:

    EMB_DIR/manifest.json        what made the vectors (backbone, weights, size, descriptor), the
                                 shard size, the file list's count and hash, the vector width and dtype
    EMB_DIR/emb_00000.npy        [n, d] L2-normalised rows, float32 or float16
    EMB_DIR/meta_00000.parquet   one row per vector: path, size, mtime_ns (row i describes vector i)
    EMB_DIR/skipped_00000.csv    the shard's unreadable files and why (only when there are some)

Shard i holds the readable files among list positions [i*S, (i+1)*S); under torchrun rank r embeds
the shards i with i % world == r, so every file is embedded once by one process, whatever the number
of processes. Each file of a shard is written atomically and the metadata last: a shard is complete
when its metadata exists and matches its vectors. A rerun embeds only the incomplete shards (a run
killed with SIGKILL loses the shards in flight, no more) and refuses a folder made with other settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinokit.errors import UserError
from dinokit.retrieval.collection import FileRecord, key_differences
from dinokit.runs.reports import write_csv
from dinokit.writing import atomic_write, write_json

SHARDS_FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")


class ShardError(UserError):
    """An embedding folder that cannot be used as asked; the message names the file and the fix."""


def shard_name(kind: str, number: int) -> str:
    suffix = {"emb": "npy", "meta": "parquet", "skipped": "csv"}[kind]
    return f"{kind}_{number:05d}.{suffix}"


def read_file_list(path: Path) -> list[Path]:
    """--list FILE: one path per line (text; blank lines and # comments skipped) or a parquet file with
    a `path` column: a collection of 10^7 files is listed once, not walked again on every run."""
    if not path.is_file():
        raise ShardError(f"--list {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["path"])
        except Exception as err:  # pyarrow raises its own kinds for a foreign or cut-short file
            raise ShardError(f"--list {path}: not a parquet file with a `path` column ({err})") from err
        paths = [str(p) for p in table.column("path").to_pylist()]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ShardError(f"--list {path}: not a UTF-8 text file of paths ({err.reason})") from err
        paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise ShardError(f"--list {path}: lists no file")
    base = path.resolve().parent  # relative entries are relative to the list's own folder
    return [Path(p) if Path(p).is_absolute() else base / p for p in paths]


def list_hash(files: Sequence[Path]) -> str:
    """sha256 of the file list in order: shard i's files are fixed by it."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """Which files make which shard, and which shards this process embeds."""

    files: tuple[Path, ...]
    shard_size: int

    @property
    def count(self) -> int:
        return -(-len(self.files) // self.shard_size)

    def files_of(self, number: int) -> tuple[Path, ...]:
        return self.files[number * self.shard_size : (number + 1) * self.shard_size]

    def shards_of_rank(self, rank: int, world: int) -> list[int]:
        """Round-robin: shard i to rank i % world (neighbouring shards, often of similar images, spread)."""
        return list(range(rank, self.count, world))


def manifest_for(key: dict[str, Any], plan: ShardPlan, dtype: str) -> dict[str, Any]:
    return {
        "format": SHARDS_FORMAT,
        "key": key,
        "shard_size": plan.shard_size,
        "files": len(plan.files),
        "files_sha256": list_hash(plan.files),
        "shards": plan.count,
        "dtype": dtype,
    }


def manifest_differences(stored: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """'setting: stored -> asked' for each difference between two manifests (the embedding key
    compared by `key_differences`, so a moved copy of the same weights is the same)."""
    differences = list(key_differences(stored["key"], asked["key"]))
    for name in ("shard_size", "dtype"):
        if stored.get(name) != asked.get(name):
            differences.append(f"{name} {stored.get(name)} -> {asked.get(name)}")
    if stored.get("files_sha256") != asked.get("files_sha256"):
        differences.append(f"the file list ({stored.get('files')} -> {asked.get('files')} files, or other files)")
    return differences


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not a readable manifest ({err}); embed into another --out") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        raise ShardError(f"{path}: not a manifest of retrieve.py embed (format {SHARDS_FORMAT})")
    return manifest


def claim_embedding_folder(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` into a new or empty `folder`, or accept a folder whose manifest says the
    same; a folder made with other settings, or holding other files, is refused in one line."""
    stored = read_manifest(folder)
    if stored is None:
        foreign = [p.name for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
        if foreign:
            raise ShardError(
                f"--out {folder}: holds {len(foreign)} file(s) (e.g. {foreign[0]}) but no {MANIFEST}: "
                "not an embedding folder; give an empty or new folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MANIFEST, manifest)
        return
    differences = manifest_differences(stored, manifest)
    if differences:
        raise ShardError(
            f"--out {folder}: embedded with other settings ({'; '.join(differences)}); "
            "give another --out for these settings, or the same flags and files to complete it"
        )


def shard_shape(folder: Path, number: int, shards: int | None = None) -> tuple[int, int]:
    """(vectors, width) of shard `number` (of `shards`, named in the message), checked: both files
    present and readable, the metadata's rows = the vectors'; else a one-line ShardError naming the file."""
    emb, meta = folder / shard_name("emb", number), folder / shard_name("meta", number)
    if not meta.is_file() or not emb.is_file():
        missing = emb.name if not emb.is_file() else meta.name
        raise ShardError(
            f"{folder / missing}: missing (shard {number}{'' if shards is None else f' of 0..{shards - 1}'} "
            "is not complete); "
            "run the same embed command again to complete the folder"
        )
    try:
        import pyarrow.parquet as pq

        table_rows = pq.read_metadata(meta).num_rows
    except Exception as err:  # pyarrow raises its own kinds for a foreign or cut-short file
        raise ShardError(f"{meta}: not a readable parquet file ({type(err).__name__}); embed again") from err
    try:
        vectors = np.load(emb, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ShardError(f"{emb}: not a readable .npy file ({err}); delete it and embed again") from err
    if vectors.ndim != 2 or len(vectors) != table_rows:
        raise ShardError(
            f"{emb}: {vectors.shape[0] if vectors.ndim else 0} vectors but {meta.name} lists {table_rows} "
            "files; delete both and embed again"
        )
    return table_rows, vectors.shape[1]


def complete_rows(folder: Path, number: int) -> int | None:
    """The vector count of shard `number` when it is complete, else None (a shard cut short by a
    kill or a full disk is embedded again)."""
    try:
        return shard_shape(folder, number)[0]
    except ShardError:
        return None


def write_shard(
    folder: Path,
    number: int,
    vectors: np.ndarray,
    records: Sequence[FileRecord],
    failures: Sequence[tuple[Path, str]],
    dtype: str,
) -> None:
    """Shard `number`: its unreadable files, its vectors, then its metadata (the completion mark),
    each file written whole or not at all."""
    skipped = folder / shard_name("skipped", number)
    if failures:
        write_csv([{"path": str(path), "reason": reason} for path, reason in failures], skipped)
    else:
        skipped.unlink(missing_ok=True)
    stored = np.ascontiguousarray(vectors, dtype=dtype)

    def save_vectors(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: numpy would otherwise append ".npy"
            np.save(handle, stored)

    atomic_write(folder / shard_name("emb", number), save_vectors)
    atomic_write(folder / shard_name("meta", number), lambda tmp: write_metadata(tmp, records))


def write_metadata(path: str, records: Sequence[FileRecord]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "path": pa.array([r.path for r in records], pa.string()),
        "size": pa.array([r.size for r in records], pa.int64()),
        "mtime_ns": pa.array([r.mtime_ns for r in records], pa.int64()),
    }
    pq.write_table(pa.table(columns), path)


@dataclass
class Shard:
    """A complete shard on disk, its vectors memory-mapped."""

    number: int
    vectors: np.ndarray  # [n, d], memory-mapped
    meta: Path

    def paths(self) -> list[str]:
        import pyarrow.parquet as pq

        return [str(p) for p in pq.read_table(self.meta, columns=["path"]).column("path").to_pylist()]


@dataclass
class Embeddings:
    """The shards of one or more `embed` folders, checked whole (every shard present, one width,
    vectors = metadata rows, one embedding key) and numbered in order: folder by folder, shard by shard."""

    folders: list[Path]
    manifest: dict[str, Any]  # the first folder's
    files: list[tuple[Path, Path]]  # (vectors, metadata) of each shard
    rows: list[int]  # vectors per shard
    dim: int

    @property
    def count(self) -> int:
        return sum(self.rows)

    @property
    def key(self) -> dict[str, Any]:
        return self.manifest["key"]

    @classmethod
    def open(cls, *folders: Path) -> Embeddings:
        """The shards of `folders` (several: machines that embedded their own parts of a list)."""
        parts = [open_folder(Path(folder)) for folder in folders]
        first = parts[0]
        for part in parts[1:]:
            differences = key_differences(first.key, part.key)
            if differences:
                raise ShardError(
                    f"--embeddings {part.folders[0]}: embedded with other settings than {first.folders[0]} "
                    f"({'; '.join(differences)}); one index holds vectors of one embedding"
                )
            if part.dim != first.dim:
                raise ShardError(
                    f"--embeddings {part.folders[0]}: {part.dim}-d vectors, {first.folders[0]}: {first.dim}-d"
                )
        embeddings = cls(
            [f for p in parts for f in p.folders], first.manifest, [f for p in parts for f in p.files],
            [r for p in parts for r in p.rows], first.dim,
        )  # fmt: skip
        if not embeddings.count:
            raise ShardError(f"--embeddings {' '.join(map(str, folders))}: no vectors (every image was unreadable)")
        return embeddings

    def shards(self) -> Iterator[Shard]:
        for number, (emb, meta) in enumerate(self.files):
            yield Shard(number, np.load(emb, mmap_mode="r"), meta)

    def rows_at(self, ids: np.ndarray) -> np.ndarray:
        """The vectors with global ids `ids` (shard order), as float32, opening only the shards that
        hold some of them and reading only those rows."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = np.cumsum([0, *self.rows])
        order = np.argsort(ids, kind="stable")
        shard_of = np.searchsorted(starts, ids[order], side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.rows) + 1))  # ids[order][bounds[n]:bounds[n+1]] in n
        out = np.empty((len(ids), self.dim), np.float32)
        for number in np.flatnonzero(np.diff(bounds)):
            chosen = order[bounds[number] : bounds[number + 1]]
            vectors = np.load(self.files[number][0], mmap_mode="r")
            out[chosen] = vectors[ids[chosen] - starts[number]]
        return out

    def paths(self) -> Iterator[str]:
        for shard in self.shards():
            yield from shard.paths()


def open_folder(folder: Path) -> Embeddings:
    """One `embed` folder's shards, each checked; a missing or faulty one named in one line."""
    manifest = read_manifest(folder)
    if manifest is None:
        what = "no such folder" if not folder.is_dir() else f"no {MANIFEST} in it"
        raise ShardError(
            f"--embeddings {folder}: {what}; make it with: python retrieve.py embed --images DIR --out {folder}"
        )
    files, rows, dims = [], [], set()
    for number in range(manifest["shards"]):
        count, dim = shard_shape(folder, number, manifest["shards"])
        emb = folder / shard_name("emb", number)
        if count and dims and dim not in dims:
            raise ShardError(
                f"{emb}: {dim}-d vectors, the shards before it are {dims.pop()}-d; "
                "shards of another run were copied in: embed into a new folder"
            )
        dims.update([dim] if count else [])  # an empty shard (every file unreadable) has no width
        files.append((emb, folder / shard_name("meta", number)))
        rows.append(count)
    return Embeddings([folder], manifest, files, rows, dims.pop() if dims else 0)


def write_vector_shards(
    folder: Path, vectors: np.ndarray, key: dict[str, Any], *, shard_size: int, dtype: str = "float32"
) -> Embeddings:
    """Vectors made elsewhere (another tool, a benchmark's generated ones) as an embedding folder,
    row i named `vector_<i>` (no file behind it): `build` and `search --vectors` take it like `embed`'s."""
    names = tuple(Path(f"vector_{row:09d}") for row in range(len(vectors)))
    plan = ShardPlan(names, shard_size)
    claim_embedding_folder(folder, manifest_for(key, plan, dtype))
    for number in range(plan.count):
        rows = slice(number * shard_size, (number + 1) * shard_size)
        records = [FileRecord(str(name), 0, 0) for name in plan.files_of(number)]
        write_shard(folder, number, vectors[rows], records, [], dtype)
    return Embeddings.open(folder)
