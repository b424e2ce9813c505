"""Which FAISS index a collection gets, from its vector count, width and a memory budget.

The order autofaiss and FAISS's own guidelines give, best recall per byte first:
  `Flat`            exact search, while the vectors fit and a query over all is fast (<= EXACT_MAX);
  `HNSW{M}`         a graph over the full vectors: the best recall/latency, ~4d + 8M bytes a vector;
  `IVF{c},Flat`     c k-means cells, full vectors, a query scans `nprobe` cells;
  `IVF{c},SQ8`      the same with 8-bit scalar codes: d bytes a vector;
  `OPQ{m}_{d'},IVF{c},PQ{m}x8`   rotated, product-quantised to m bytes a vector (m as large as fits).
Every inverted-list entry also holds its 8-byte id. The cell count grows as 2·sqrt(N) (a power of
two), with an HNSW coarse quantizer from HNSW_QUANTIZER_CELLS cells on (assigning a vector to one of
65,536 centroids exhaustively is what makes 10^9-vector builds slow). Estimates are the index's
bytes once built; what the build holds on top (training sample, one batch) is bounded separately.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dinokit.errors import UserError

EXACT_MAX = 200_000  # vectors searched exhaustively at most (a few ms a query here, bench.py)
HNSW_MAX = 2_000_000  # beyond this an HNSW build takes hours on a few cores; IVF instead
HNSW_LINKS = (32, 16)  # links a vector, best first; fewer than 16 loses too much recall
HNSW_QUANTIZER_CELLS = 16_384
ID_BYTES = 8  # an inverted list's id per vector
PQ_BYTES = (128, 96, 64, 48, 32, 24, 16, 8)  # OPQ+PQ code sizes tried, largest (best recall) first
POINTS_PER_CELL = 64  # k-means training points a cell (FAISS warns below 39)
MIN_TRAIN = 1_000  # fewer vectors than this: exact search, there is nothing to approximate
INDEX_KINDS = ("exact", "hnsw", "ivf-flat", "ivf-sq8", "opq-ivf-pq")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'600MB', '1.5GB', '512MiB', '4000000' -> bytes (decimal units as autofaiss reads them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in UNITS:
        raise ValueError(f"{text!r}: not a size; write e.g. 600MB, 1.5GB or 512MiB")
    return int(float(match.group(1)) * UNITS[unit])


def format_size(size: float) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string, what it costs, and the search parameter that trades recall for speed."""

    factory: str
    kind: str  # exact | hnsw | ivf-flat | ivf-sq8 | opq-ivf-pq
    bytes: int  # the built index, estimated
    cells: int = 0  # IVF cells (0: not an IVF index)
    parameter: str | None = None  # nprobe | efSearch | None (exact)

    @property
    def train_size(self) -> int:
        """Vectors the index is trained on (k-means, scalar ranges, OPQ rotation and codebooks)."""
        return self.cells * POINTS_PER_CELL if self.cells else 0


def cell_count(count: int) -> int:
    """IVF cells for `count` vectors: the power of two nearest 2·sqrt(count), at most count / POINTS_PER_CELL."""
    cells = 2 ** round(math.log2(max(2 * math.sqrt(count), 1)))
    while cells > 1 and cells * POINTS_PER_CELL > count:
        cells //= 2
    return cells


def candidates(count: int, dim: int) -> list[IndexChoice]:
    """Every index this module would build for `count` vectors of `dim`, in order of preference."""
    flat = count * 4 * dim
    choices = []
    if count <= EXACT_MAX or count < MIN_TRAIN:
        choices.append(IndexChoice("Flat", "exact", flat))
    if count < MIN_TRAIN:
        return choices
    if count <= HNSW_MAX:
        for links in HNSW_LINKS:
            choices.append(IndexChoice(f"HNSW{links}", "hnsw", int(count * (4 * dim + 8 * links * 1.1)), 0, "efSearch"))
    cells = cell_count(count)
    coarse = f"IVF{cells}_HNSW32" if cells >= HNSW_QUANTIZER_CELLS else f"IVF{cells}"
    centroids = cells * 4 * dim * (2 if cells >= HNSW_QUANTIZER_CELLS else 1)
    choices.append(IndexChoice(f"{coarse},Flat", "ivf-flat", count * (4 * dim + ID_BYTES) + centroids, cells, "nprobe"))
    choices.append(
        IndexChoice(f"{coarse},SQ8", "ivf-sq8", count * (dim + ID_BYTES) + centroids + 8 * dim, cells, "nprobe")
    )
    for code in PQ_BYTES:
        if code >= dim:
            continue
        width = (dim // code) * code  # the rotation's output: a multiple of the code size, at most d
        bits = 8 if count >= 256 * POINTS_PER_CELL else 4
        extra = 4 * dim * width + 4 * width * (2**bits)  # rotation matrix + codebooks
        choices.append(
            IndexChoice(
                f"OPQ{code}_{width},{coarse},PQ{code}x{bits}",
                "opq-ivf-pq",
                count * (code * bits // 8 + ID_BYTES) + centroids * width // dim + extra,
                cells,
                "nprobe",
            )
        )
    return choices


def choose_index(count: int, dim: int, budget: int, kind: str = "auto") -> IndexChoice:
    """The first of `candidates` (of `kind`, unless "auto") that fits in `budget` bytes; a budget
    none fits is refused naming the smallest that works."""
    options = [c for c in candidates(count, dim) if kind in ("auto", c.kind)]
    if not options:
        raise UserError(f"--kind {kind}: not built for {count:,} vectors (see docs/retrieval.md); use --kind auto")
    for choice in options:
        if choice.bytes <= budget:
            return choice
    smallest = min(options, key=lambda c: c.bytes)
    raise UserError(
        f"--max-memory {format_size(budget)}: no {'' if kind == 'auto' else kind + ' '}index of {count:,} {dim}-d "
        "vectors fits; the smallest "
        f"({smallest.factory}) needs {format_size(smallest.bytes)}: give at least --max-memory "
        f"{math.ceil(smallest.bytes / 10**6)}MB"
    )
