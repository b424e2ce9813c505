"""Near-duplicate groups: images linked when their descriptors' cosine similarity reaches a
threshold, groups = connected components (the copy detection of DINOv2's data curation, which
links embeddings by a similarity threshold and removes all but one of each component)."""

from __future__ import annotations

import numpy as np

from dinokit.retrieval.vector_index import build_index

CHUNK = 4096  # query rows per range search: bounds the memory of the result lists


def duplicate_groups(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Row numbers of each group of two or more images, largest group first (rows in order)."""
    index = build_index(vectors, "exact")
    parent = list(range(len(vectors)))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for start in range(0, len(vectors), CHUNK):
        limits, _, found = index.range_search(vectors[start : start + CHUNK], threshold)
        for offset in range(len(limits) - 1):
            for other in found[limits[offset] : limits[offset + 1]]:
                a, b = root(start + offset), root(int(other))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        groups.setdefault(root(row), []).append(row)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
