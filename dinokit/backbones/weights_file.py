"""Which weights file made a set of embeddings: its absolute path, size and SHA-256.

A name (`--backbone small --weights w.pth`) does not say which weights made an index's or a
cache's vectors: the file can be replaced, and a relative `--weights` finds another file from
another working directory. Queries embedded by other weights than the stored vectors give wrong
neighbours without any error, so what is stored is the file's content hash, computed once per
file and process, and every later use checks the file it loads against it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from dinokit.errors import UserError

_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hashed once a process


class WeightsChangedError(UserError):
    """The weights file differs from the one that made stored embeddings."""


def is_url(weights: str | Path) -> bool:
    """A --weights that names a download (Meta's signed DINOv3 URLs), not a local file."""
    return str(weights).startswith(("https://", "http://", "file://"))


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes are the weights: the file itself, or a snapshot folder's config and tensor files."""
    if not path.is_dir():
        return [path]
    return sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".json"))
    )


def weights_size(path: str | Path) -> int:
    return sum(os.stat(p).st_size for p in weight_files(Path(path)))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file's bytes, or of a snapshot folder's files in name order (memoised for
    the process by path, size and modification time)."""
    path = Path(path).resolve()
    files = weight_files(path)
    key = (str(path), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            if len(files) > 1:
                digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def weights_identity(path: str | Path) -> dict[str, Any]:
    """{"path": absolute path, "size": bytes, "sha256": content hash} of a local weights file."""
    resolved = Path(path).resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"--weights {path}: file not found")
    return {"path": str(resolved), "size": weights_size(resolved), "sha256": file_sha256(resolved)}


def describe_identity(identity: dict[str, Any]) -> str:
    """'/abs/w.pth (88,012,345 bytes, sha256 1a2b3c4d…)'."""
    return f"{identity['path']} ({identity['size']:,} bytes, sha256 {identity['sha256'][:12]})"


def check_weights_unchanged(stored: dict[str, Any], made: str, fix: str) -> None:
    """Refuse when the file `stored` names is gone or no longer has the stored content. `made`: what
    the file made ("the index photos.index was embedded"), `fix`: the command that re-embeds."""
    path = Path(stored["path"])
    if not path.exists():
        raise WeightsChangedError(
            f"{path}: the weights file {made} with is gone; put it back (sha256 {stored['sha256'][:12]}), "
            f"give --weights FILE with the same content, or re-embed: {fix}"
        )
    size = weights_size(path)
    if size != stored["size"] or file_sha256(path) != stored["sha256"]:
        now = {"path": str(path), "size": size, "sha256": file_sha256(path)}
        raise WeightsChangedError(
            f"{path}: the weights file {made} with has changed since ({describe_identity(stored)} then, "
            f"{size:,} bytes, sha256 {now['sha256'][:12]} now); queries would be embedded by other weights: "
            f"put the original back or re-embed: {fix}"
        )
