"""FAISS indexes over L2-normalised embeddings: inner product = cosine similarity.

- `exact`: `IndexFlatIP`, every stored vector compared with every query (what retrieval is
  measured against);
- `hnsw`: `IndexHNSWFlat` (32 links per vector, efSearch 128): a graph walk, no training, the
  vectors kept in full (memory ~ N x (4d + 256) bytes);
- `ivfpq`: `IndexIVFPQ`: the vectors split into ~4 sqrt(N) cells by k-means and compressed to
  d/4 bytes each (8-bit product quantisation), 32 cells searched per query; trained on (a sample
  of) the collection itself (fewer bits per code below 10,000 vectors, where 256-entry codebooks
  cannot be trained). For collections whose vectors do not fit in memory.

`auto` takes `exact` up to AUTO_EXACT vectors (where it is fast enough here, see bench.py) and
`hnsw` beyond, `ivfpq` where the full vectors would exceed a quarter of this machine's RAM. An
approximate index is always built with its recall@10 against exact search measured on (up to)
RECALL_QUERIES of its own vectors. Beyond one machine, FAISS's own `IndexShards` (or an IVF index
whose inverted lists live on several machines) splits a collection: this module does not shard.
"""

from __future__ import annotations

import math
import os

import numpy as np

KINDS = ("exact", "hnsw", "ivfpq", "auto")
AUTO_EXACT = 200_000  # vectors; above this `auto` builds an approximate index
HNSW_LINKS, HNSW_EF_SEARCH, HNSW_EF_CONSTRUCTION = 32, 128, 80
IVF_PROBES = 32
IVFPQ_MIN_VECTORS = 16  # the smallest codebooks (4 bits) need 16 training vectors
TRAIN_SAMPLE = 100_000  # vectors an IVF-PQ index is trained on, at most
RECALL_QUERIES = 1000


def faiss_module():
    """FAISS, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        from dinokit.errors import UserError

        raise UserError(f"faiss is not installed ({err}); pip install faiss-cpu (or faiss-gpu)") from err
    return faiss


def normalised(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (a zero row stays zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def choose_kind(count: int, dim: int, memory_bytes: int | None = None) -> str:
    """What `auto` builds for `count` vectors of `dim` (module docstring)."""
    memory_bytes = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if count <= AUTO_EXACT:
        return "exact"
    return "hnsw" if count * (4 * dim + 8 * HNSW_LINKS) < memory_bytes / 4 else "ivfpq"


def check_kind(kind: str, count: int) -> None:
    """Refuse, before any embedding, an index kind that cannot be built on `count` vectors."""
    if kind == "ivfpq" and count < IVFPQ_MIN_VECTORS:
        from dinokit.errors import UserError

        raise UserError(
            f"--kind ivfpq: needs at least {IVFPQ_MIN_VECTORS} images to train its codebooks, the collection has "
            f"{count}; use --kind exact (exact search is fast at this size) or hnsw"
        )


def build_index(vectors: np.ndarray, kind: str = "exact", *, seed: int = 0):
    """A FAISS index of `kind` holding `vectors` (normalised rows), trained on them where it needs it."""
    faiss = faiss_module()
    count, dim = vectors.shape
    kind = choose_kind(count, dim) if kind == "auto" else kind
    if kind == "exact" or count == 0:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
    elif kind == "ivfpq":
        check_kind(kind, count)
        index = ivfpq_index(vectors, seed)
    else:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    index.add(vectors)
    return index


def ivfpq_index(vectors: np.ndarray, seed: int):
    """An untrained-then-trained IVF-PQ index for `vectors` (cells and code size from their count and width)."""
    faiss = faiss_module()
    count, dim = vectors.shape
    cells = max(1, min(int(4 * math.sqrt(count)), min(count, TRAIN_SAMPLE) // 39))  # k-means: ~39 points a cell
    subquantizers = next(m for m in (dim // 4, dim // 8, dim // 16, dim // 2, dim) if m and dim % m == 0)
    bits = 8 if count >= 39 * 256 else max(4, int(math.log2(max(count // 39, 16))))  # codebooks want ~39 points/code
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, cells, subquantizers, bits, faiss.METRIC_INNER_PRODUCT)
    sample = vectors
    if count > TRAIN_SAMPLE:
        sample = vectors[np.random.default_rng(seed).choice(count, TRAIN_SAMPLE, replace=False)]
    index.train(sample)
    index.nprobe = min(IVF_PROBES, cells)
    return index


def index_kind(index) -> str:
    faiss = faiss_module()
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    return "exact"


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, row numbers) `[Q, k]` of the `k` nearest stored vectors of each query, best first."""
    similarities, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return similarities, rows


def recall_against_exact(index, vectors: np.ndarray, k: int = 10, *, seed: int = 0) -> float:
    """Share of the exact top-`k` neighbours an approximate `index` over `vectors` finds, for up to
    RECALL_QUERIES of its own vectors as queries (recall@k; 1.0 for an exact index)."""
    count = len(vectors)
    k = min(k, count)
    if index_kind(index) == "exact" or count == 0:
        return 1.0
    chosen = np.random.default_rng(seed).choice(count, min(RECALL_QUERIES, count), replace=False)
    queries = vectors[chosen]
    _, truth = build_index(vectors, "exact").search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / truth.size


def to_bytes(index) -> np.ndarray:
    """The index serialised (uint8), for storing inside one file with the rest of a collection."""
    return faiss_module().serialize_index(index)


def from_bytes(data: np.ndarray):
    return faiss_module().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
