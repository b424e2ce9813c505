"""What a model, weights or head file is, from its content (never from its extension), and which
flag takes it.

A file given to the wrong flag (an .onnx renamed .pth, a head given to --weights, a photo given to
--head-weights) must be named for what it is. torch's own error for such files advises loading with
`weights_only=False`, which would run code from the file: the wrong fix, and an unsafe one.

Also a list of files' identity (`fingerprint_files`): what caches made from them are keyed by.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dinokit.errors import UserError

# Which flag of which script takes each kind of file.
TAKES = {
    "training checkpoint": (
        "--model of infer_image.py / infer_video.py / evaluate.py / export.py / app.py, or train.py --resume"
    ),
    "image classifier": "classify.py --predict --model",
    "pretraining checkpoint": "pretrain.py --resume (its backbone.pth goes to --weights)",
    "segmentation head": "--head-weights",
    "depth head": "--head-weights of infer_image.py / infer_video.py",
    "backbone weights": "--weights",
    "ONNX model": "--model of infer_image.py / infer_video.py / evaluate.py / app.py",
    "retrieval index": "--index of retrieve.py and app.py",
}

_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
)


class FileKindError(UserError, ValueError):
    """A file that is not what the flag it was given to takes; the message says what it is."""


def sniff(path: str | Path) -> str:
    """What the bytes of `path` are: "torch" (PyTorch's zip format), "torch-legacy" (a pickle), "damaged zip",
    "onnx", "safetensors", "retrieval index" (retrieve.py's), "empty", or a description ("a JPEG
    image", "a NumPy array", "a zip archive", "text", "unknown data")."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if len(head) >= 10 and head[8:10] == b'{"' and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    if _looks_like_onnx(head):
        return "onnx"
    return "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown data"


def _zip_kind(path: str | Path) -> str:
    """A zip file: PyTorch's format (a `data.pkl` inside), retrieve.py's index (NumPy's .npz with a
    `table` and `vectors`), another .npz, another archive, or "damaged zip" (cut short: each
    reader names it so, as a damaged file of the kind it expects)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "damaged zip"
    if any(name.endswith("data.pkl") for name in names):
        return "torch"
    if {"table.npy", "vectors.npy", "index.npy"} <= set(names):
        return "retrieval index"
    if names and all(name.endswith(".npy") for name in names):
        return "a NumPy archive (.npz)"
    return "a zip archive"


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, a small varint), then usually field 8
    (opset_import) or 2 (producer_name): bytes 0x08 <version> 0x12 / 0x1a / 0x42."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 20 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42)


def describe(kind: str) -> str:
    """A sniffed kind in words, for messages."""
    return {
        "torch": "a PyTorch file",
        "torch-legacy": "a PyTorch file (legacy format)",
        "onnx": "an ONNX model",
        "safetensors": "a safetensors file",
        "empty": "an empty file",
    }.get(kind, kind)


def torch_contents(value: Any) -> str | None:
    """What a loaded PyTorch file holds, as a key of TAKES (None: nothing this toolkit knows)."""
    if not isinstance(value, dict):
        return None
    if value.get("kind") == "image-classifier":
        return "image classifier"
    if value.get("kind") == "pretraining-checkpoint":
        return "pretraining checkpoint"
    if "model" in value and "model_info" in value:
        return "training checkpoint"
    state = value.get("state_dict", value)
    if isinstance(state, dict) and any(str(key).startswith("decode_head.conv_depth") for key in state):
        return "depth head"
    if isinstance(state, dict) and any(str(key).startswith("decode_head.") for key in state):
        return "segmentation head"
    if isinstance(state, dict) and ("cls_token" in state or "patch_embed.proj.weight" in state):
        return "backbone weights"
    return None


def file_kind(path: str | Path) -> str:
    """What a file is, for a message: a TAKES key where this toolkit knows it (a PyTorch file is
    loaded safely to tell a checkpoint from weights or a head), else a `describe`d kind."""
    kind = sniff(path)
    if kind == "onnx":
        return "ONNX model"
    if kind in TAKES:
        return kind
    if kind in ("torch", "torch-legacy"):
        try:
            found = torch_contents(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - unreadable: named by its format alone
            found = None
        return found or describe(kind)
    return describe(kind)


def wrong_file(path: str | Path, found: str, wanted: str) -> FileKindError:
    """The error for a file of kind `found` (a TAKES key or a `describe`d kind) given where `wanted` goes."""
    hint = f"; it goes to {TAKES[found]}" if found in TAKES else ""
    article = "an" if found[0] in "aeiouAEIOU" else "a"
    what = f"{article} {found}" if found in TAKES else found
    return FileKindError(f"{path}: is {what}, not {wanted}{hint}")


def read_torch_file(path: str | Path, wanted: str, map_location: str | torch.device = "cpu") -> Any:
    """Load a PyTorch file safely (`weights_only=True`: no code runs from it), after checking from
    its bytes that it is one. `wanted`, a key of TAKES, is what the caller expects: a file that holds
    another kind this toolkit knows is refused, naming it; one of no known kind is returned for the
    caller's own checks."""
    path = Path(path)
    value = _load_torch(path, _with_article(wanted), map_location)
    found = torch_contents(value)
    if found not in (None, wanted):
        raise wrong_file(path, found, _with_article(wanted))
    return value


def _with_article(kind: str) -> str:
    return kind if kind == "backbone weights" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _load_torch(path: Path, wanted: str, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    kind = sniff(path)
    if kind == "onnx":
        raise wrong_file(path, "ONNX model", wanted)
    if kind == "retrieval index":
        raise wrong_file(path, kind, wanted)
    if kind not in ("torch", "torch-legacy", "damaged zip"):
        raise wrong_file(path, describe(kind), wanted)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise FileKindError(
            f"{path}: not a readable {wanted.removeprefix('a ').removeprefix('an ')} ({_reason(err)})"
        ) from err


def _reason(err: BaseException) -> str:
    """torch's load error without its advice to load unsafely."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds Python objects that a safe load refuses: not a file written by this toolkit or Meta"
    first = text.splitlines()[0] if text else type(err).__name__
    if "failed finding central directory" in first or "unexpected EOF" in first or isinstance(err, EOFError):
        return "truncated or damaged"
    return first[:200]


def fingerprint_files(files: Iterable[str | Path]) -> str:
    """Identity of a list of files: every path with its size and modification time (a cache made
    from them is stale once any of these changes)."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
