"""A FAISS index built from embedding shards without holding the vectors, and served memory-mapped.

Build (`build_index_folder`): the index kind for the count, width and memory budget
(index_plan.py); trained on a random sample of the shards; filled shard by shard in batches of
ADD_BATCH_BYTES; its search parameter (`nprobe` or `efSearch`) tuned to the smallest value whose
recall@k reaches the target, measured on RECALL_QUERIES vectors of the collection against exact
search over all shards (streamed; each query's own vector is left out of both lists, so a vector
finding itself does not count). Written as one folder, swapped in whole:

    PATH/index.faiss        FAISS's own file (read memory-mapped: IVF lists or flat codes stay on disk)
    PATH/paths.bin          every image path, UTF-8, one after another
    PATH/path_offsets.bin   little-endian uint64 [N + 1]: path i is paths.bin[offsets[i]:offsets[i+1]]
    PATH/index.json         the kind, factory string, tuned parameter, recall, embedding key, shards

The id table is memory-mapped too: a lookup reads only the paths of the hits, at any N.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinokit.errors import UserError
from dinokit.retrieval.collection import index_path
from dinokit.retrieval.index_plan import IndexChoice, format_size
from dinokit.retrieval.shards import Embeddings
from dinokit.retrieval.vector_index import faiss_module, normalised
from dinokit.writing import atomic_folder, write_json

INDEX_FILE, PATHS_FILE, OFFSETS_FILE, SETTINGS_FILE = "index.faiss", "paths.bin", "path_offsets.bin", "index.json"
FOLDER_FORMAT = 1
RECALL_QUERIES = 1000
RECALL_K = 10
ADD_BATCH_BYTES = 64 * 10**6  # float32 vectors handed to FAISS at once: bounds the build's memory beyond the index
EXACT_CHUNK = 16_384  # stored vectors compared with all queries at once in the exact search
SWEEP = {"nprobe": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], "efSearch": [16, 32, 64, 128, 256, 512]}
QUANTIZER_EF_SEARCH = 128
OPQ_ITERATIONS = 10  # an HNSW coarse quantizer's own search breadth


class IndexFolderError(UserError):
    """An index folder that cannot be read as asked."""


def peak_rss() -> int:
    """This process's peak resident memory so far, bytes: VmHWM of its own address space (getrusage's
    maxrss also counts the parent's memory at fork, so a build started by a large process read high)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """This process's resident memory now, bytes (what the interpreter and its libraries hold before a build)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux
        return 0


@dataclass
class BuildReport:
    """What `build` prints and stores: the index and what it took."""

    kind: str
    factory: str
    vectors: int
    dim: int
    index_bytes: int
    build_seconds: float  # training + filling
    train_seconds: float
    peak_rss_bytes: int
    start_rss_bytes: int  # before the build: the interpreter, PyTorch and FAISS loaded
    recall: float  # recall@RECALL_K against exact search at the tuned parameter
    parameter: str | None = None
    value: int | None = None
    query_ms: float = 0.0  # per query, RECALL_QUERIES searched in one batch
    sweep: list[dict[str, float]] = field(default_factory=list)  # recall and ms per parameter value tried

    def summary(self) -> str:
        tuned = f", {self.parameter} {self.value}" if self.parameter else ""
        return (
            f"{self.factory} ({self.kind}{tuned}): {self.vectors:,} x {self.dim}-d, "
            f"{format_size(self.index_bytes)}, built in {self.build_seconds:.1f} s "
            f"({self.train_seconds:.1f} s training), peak RSS "
            f"{format_size(self.peak_rss_bytes)} ({format_size(self.start_rss_bytes)} before the build), "
            f"recall@{RECALL_K} {self.recall:.4f}, {self.query_ms:.3f} ms/query"
        )


def batches(embeddings: Embeddings):
    """The stored vectors in shard order as float32 batches of at most ADD_BATCH_BYTES."""
    rows = max(1, ADD_BATCH_BYTES // (4 * embeddings.dim))
    for shard in embeddings.shards():
        for start in range(0, len(shard.vectors), rows):
            yield np.ascontiguousarray(shard.vectors[start : start + rows], dtype=np.float32)


def sample_ids(count: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct ids of `count`, sorted (shards are read in order)."""
    return np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))


def exact_neighbours(embeddings: Embeddings, queries: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] ids of each query's k most similar stored vectors, its own id left out; stored vectors
    streamed EXACT_CHUNK at a time (the queries stay, the collection never is in memory)."""
    faiss = faiss_module()
    best_sims = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for shard in embeddings.shards():
        for start in range(0, len(shard.vectors), EXACT_CHUNK):
            chunk = np.ascontiguousarray(shard.vectors[start : start + EXACT_CHUNK], dtype=np.float32)
            sims, ids = faiss.knn(queries, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            ids = ids + offset + start
            sims[ids == own_ids[:, None]] = -np.inf
            all_sims, all_ids = np.hstack([best_sims, sims]), np.hstack([best_ids, ids])
            top = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
            best_sims, best_ids = np.take_along_axis(all_sims, top, 1), np.take_along_axis(all_ids, top, 1)
        offset += len(shard.vectors)
    return best_ids


def recall_at(found: np.ndarray, truth: np.ndarray, own_ids: np.ndarray, k: int) -> float:
    """Share of the true top-k (self excluded) found in the index's top-k (self excluded)."""
    hits = 0
    for row, true, own in zip(found.tolist(), truth.tolist(), own_ids.tolist()):
        hits += len(set([r for r in row if r != own and r >= 0][:k]) & set(true))
    return hits / truth.size


def set_parameter(index, name: str | None, value: int | None) -> None:
    if name is not None and value is not None:
        faiss_module().ParameterSpace().set_index_parameter(index, name, value)


def timed_search(index, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """The ids of each query's RECALL_K + 1 hits and the milliseconds per query, searched as one batch."""
    started = time.perf_counter()
    _, found = index.search(queries, RECALL_K + 1)
    return found, (time.perf_counter() - started) * 1000 / len(queries)


def tune(index, choice: IndexChoice, queries, truth, own_ids, target: float) -> tuple[int | None, float, float, list]:
    """The smallest parameter value reaching `target` recall (or the best tried), its recall, its
    ms per query, and every value tried."""
    values = [None] if choice.parameter is None else SWEEP[choice.parameter]
    if choice.parameter == "nprobe":
        values = [v for v in values if v <= choice.cells]
    tried = []
    for value in values:
        set_parameter(index, choice.parameter, value)
        found, ms = timed_search(index, queries)
        recall = recall_at(found, truth, own_ids, RECALL_K)
        tried.append({"value": value, "recall": round(recall, 4), "ms_per_query": round(ms, 4)})
        if recall >= target:
            break
    best = tried[-1] if tried[-1]["recall"] >= target else max(tried, key=lambda t: t["recall"])
    set_parameter(index, choice.parameter, best["value"])
    return best["value"], best["recall"], best["ms_per_query"], tried


def train_and_fill(choice: IndexChoice, embeddings: Embeddings, seed: int) -> tuple[Any, float]:
    """The index of `choice`, trained on a sample of the shards and filled batch by batch, and the
    seconds the training took (the rest is filling: what grows with the collection)."""
    faiss = faiss_module()
    index = faiss.index_factory(embeddings.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.factory.startswith("HNSW"):
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if choice.factory.startswith("OPQ"):  # FAISS's 50 rotation iterations take minutes per 10^5 samples
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
    if "_HNSW" in choice.factory:
        set_parameter(index, "quantizer_efSearch", QUANTIZER_EF_SEARCH)
    started = time.perf_counter()
    if not index.is_trained:
        sample = embeddings.rows_at(sample_ids(embeddings.count, choice.train_size, seed))
        index.train(sample)
        del sample
    trained = time.perf_counter() - started
    for batch in batches(embeddings):
        index.add(batch)
    return index, trained


def build_index_folder(
    path: Path, embeddings: Embeddings, choice: IndexChoice, *, recall_target: float, seed: int = 0
) -> BuildReport:
    """Build `choice` over `embeddings`, tune it to `recall_target`, and write the folder `path` whole."""
    start_rss, started = current_rss(), time.perf_counter()
    index, train_seconds = train_and_fill(choice, embeddings, seed)
    built = time.perf_counter() - started
    own_ids = sample_ids(embeddings.count, RECALL_QUERIES, seed + 1)
    queries = normalised(embeddings.rows_at(own_ids))
    if choice.parameter is None:  # exact search: recall 1 by construction (ties would only blur a measurement)
        value, recall, ms, tried = None, 1.0, timed_search(index, queries)[1], []
    else:
        truth = exact_neighbours(embeddings, queries, own_ids, min(RECALL_K, embeddings.count - 1))
        value, recall, ms, tried = tune(index, choice, queries, truth, own_ids, recall_target)
    report = BuildReport(
        choice.kind, choice.factory, embeddings.count, embeddings.dim, 0, built, train_seconds, 0, start_rss, recall,
        choice.parameter, value, ms, tried,
    )  # fmt: skip

    def write(folder: Path) -> None:
        faiss_module().write_index(index, str(folder / INDEX_FILE))
        write_path_table(folder, embeddings)
        report.index_bytes = (folder / INDEX_FILE).stat().st_size
        report.peak_rss_bytes = peak_rss()
        settings = {
            "format": FOLDER_FORMAT,
            "key": embeddings.key,
            "embeddings": [str(folder.resolve()) for folder in embeddings.folders],
            "shards": len(embeddings.rows),
            "recall_target": recall_target,
            **asdict(report),
        }
        write_json(folder / SETTINGS_FILE, settings)

    atomic_folder(path, write)
    return report


def write_path_table(folder: Path, embeddings: Embeddings) -> None:
    """paths.bin + path_offsets.bin, streamed shard by shard."""
    offset = 0
    with open(folder / PATHS_FILE, "wb") as paths, open(folder / OFFSETS_FILE, "wb") as offsets:
        offsets.write(np.zeros(1, "<u8").tobytes())
        for shard in embeddings.shards():
            encoded = [p.encode() for p in shard.paths()]
            ends = offset + np.cumsum([len(e) for e in encoded], dtype=np.uint64)
            paths.write(b"".join(encoded))
            offsets.write(ends.astype("<u8").tobytes())
            offset = int(ends[-1]) if len(ends) else offset


def index_folder_path(name: str | Path) -> Path:
    """--index NAME of `build`: outputs/retrieval/NAME/ (collection.index_path's rule)."""
    return index_path(name, suffix="")


def is_index_folder(path: Path) -> bool:
    return path.is_dir() and (path / SETTINGS_FILE).is_file()


@dataclass
class IndexFolder:
    """A built index folder, opened for search: the FAISS index and the id table memory-mapped."""

    path: Path
    settings: dict[str, Any]
    index: Any
    offsets: np.ndarray
    paths_blob: np.ndarray
    key: dict[str, Any] = field(default_factory=dict)  # what made the vectors (queries are embedded by it)

    @classmethod
    def open(cls, path: Path) -> IndexFolder:
        faiss = faiss_module()
        try:
            settings = json.loads((path / SETTINGS_FILE).read_text())
        except (OSError, ValueError) as err:
            raise IndexFolderError(f"{path / SETTINGS_FILE}: not readable ({err}); build the index again") from err
        if settings.get("format") != FOLDER_FORMAT:
            raise IndexFolderError(
                f"{path / SETTINGS_FILE}: index format {settings.get('format')!r}, not {FOLDER_FORMAT}"
            )
        flag = faiss.IO_FLAG_MMAP if settings["kind"].startswith(("ivf", "opq")) else faiss.IO_FLAG_MMAP_IFC
        try:
            index = faiss.read_index(str(path / INDEX_FILE), flag)
            offsets = np.memmap(path / OFFSETS_FILE, dtype="<u8", mode="r")
            blob = np.memmap(path / PATHS_FILE, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
        except (OSError, RuntimeError, ValueError) as err:
            reason = str(err).splitlines()[0][:200]
            raise IndexFolderError(
                f"{path}: a file of the index is missing or cut short ({reason}); build it again"
            ) from err
        if len(offsets) != index.ntotal + 1:
            raise IndexFolderError(
                f"{path / OFFSETS_FILE}: {len(offsets) - 1} paths for {index.ntotal} vectors; build the index again"
            )
        set_parameter(index, settings.get("parameter"), settings.get("value"))
        return cls(path, settings, index, offsets, blob, settings["key"])

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return self.settings["kind"]

    def refresh_command(self, path: Path) -> str:
        """What brings this index up to date: embed the new files, build again."""
        folders = " ".join(self.settings["embeddings"])
        return (
            f"python retrieve.py embed --images DIR --out {self.settings['embeddings'][-1]} && python retrieve.py "
            f"build --embeddings {folders} --index {path} --max-memory SIZE"
        )

    def rebuild_command(self, path: Path, flags: str) -> str:
        """Other embeddings are another embedding folder: embed into a new one, build from it."""
        return (
            f"python retrieve.py embed --images DIR --out NEW_EMB_DIR {flags} && python retrieve.py build "
            f"--embeddings NEW_EMB_DIR --index {path} --max-memory SIZE"
        )

    def missing_files(self, paths: list[str]) -> list[str]:
        return [p for p in paths if not Path(p).is_file()]

    def indexed_folders(self) -> list[Path]:
        return []  # the images may be anywhere (a --list); results go beside the index unless --out-dir

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def path_of(self, row: int) -> str:
        return bytes(self.paths_blob[int(self.offsets[row]) : int(self.offsets[row + 1])]).decode()

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
