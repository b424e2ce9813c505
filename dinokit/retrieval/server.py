"""`retrieve.py serve`: an index answering HTTP JSON queries, standard library only.

    GET  /health               {"vectors": N, "dim": d, "kind": ..., "images": true|false}
    POST /search?k=10          body: an image (Content-Type image/* or application/octet-stream)
                               or JSON {"vector": [d floats], "k": 10}
                            -> {"k": 10, "results": [{"id": 17, "path": "...", "similarity": 0.93}, ...]}

Bound to 127.0.0.1 unless --host says otherwise; a body over `max_bytes` (413), a k over `max_k`, a
vector of the wrong width or with non-finite values, an unreadable image: one-line JSON errors
(400), never a traceback. FAISS searches run concurrently (threads; FAISS releases the GIL); the
backbone embeds one uploaded image at a time.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from dinokit.retrieval.vector_index import faiss_module, normalised


class RequestError(Exception):
    """A request that cannot be answered; `status` is the HTTP status it gets."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class SearchService:
    """What the handler calls: parses a query, searches `target` (an index folder or a one-file
    index), returns JSON-ready results. `embed_image(path) -> [1, d]` is None when the server was
    started for vectors only."""

    def __init__(
        self,
        target: Any,
        embed_image: Callable[[Path], np.ndarray] | None,
        *,
        default_k: int = 10,
        max_k: int = 100,
        max_bytes: int = 10 * 2**20,
    ):
        self.target, self.embed_image = target, embed_image
        self.default_k, self.max_k, self.max_bytes = default_k, max_k, max_bytes
        self.dim = target.dim
        self._embedding = threading.Lock()  # one forward at a time: the backbone is shared

    def health(self) -> dict[str, Any]:
        return {
            "vectors": self.target.count,
            "dim": self.dim,
            "kind": self.target.kind,
            "images": self.embed_image is not None,
        }

    def k_of(self, value: Any) -> int:
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise RequestError(f"k: {value!r} is not an integer") from None
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k: {k} outside 1..{self.max_k} (the server's --max-k)")
        return min(k, self.target.count)

    def vector_of(self, body: bytes, content_type: str, query: dict[str, list[str]]) -> tuple[np.ndarray, int]:
        """The query vector [1, d] and k of a request body."""
        k = query.get("k", [self.default_k])[0]
        if content_type.startswith("application/json"):
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(f"the body is not JSON ({err})") from None
            if not isinstance(payload, dict) or "vector" not in payload:
                raise RequestError('a JSON query is {"vector": [floats], "k": 10}')
            k = payload.get("k", k)
            try:
                vector = np.asarray(payload["vector"], dtype=np.float32).reshape(1, -1)
            except (TypeError, ValueError):
                raise RequestError("vector: not a list of numbers") from None
            if vector.shape[1] != self.dim:
                raise RequestError(f"vector: {vector.shape[1]} values, the index holds {self.dim}-d vectors")
            if not np.isfinite(vector).all() or not np.linalg.norm(vector):
                raise RequestError("vector: holds a non-finite value or is all zeros")
            return normalised(vector), self.k_of(k)
        if content_type.startswith(("image/", "application/octet-stream")):
            if self.embed_image is None:
                raise RequestError("this server answers vectors only (started with --vectors-only)")
            return self.embedded(body), self.k_of(k)
        raise RequestError(
            f"Content-Type {content_type or '(none)'}: send application/json or an image",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )

    def embedded(self, body: bytes) -> np.ndarray:
        """The uploaded image's descriptor, made by the index's own preprocessing (a temporary file:
        the same path as `retrieve.py search` takes)."""
        with tempfile.TemporaryDirectory(prefix="retrieve-serve-") as folder, self._embedding:
            path = Path(folder) / "query"
            path.write_bytes(body)
            vector = self.embed_image(path)
        if vector is None or not len(vector):
            raise RequestError("the body is not a readable image")
        return vector

    def search(self, body: bytes, content_type: str, query: dict[str, list[str]]) -> dict[str, Any]:
        vector, k = self.vector_of(body, content_type, query)
        similarities, rows = self.target.search(vector, k)
        results = [
            {"id": int(row), "path": self.target.path_of(int(row)), "similarity": round(float(sim), 6)}
            for row, sim in zip(rows[0], similarities[0])
            if row >= 0 and math.isfinite(sim)
        ]
        return {"k": k, "results": results}


def handler_for(service: SearchService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's queries reuse one connection
        timeout = 60  # seconds a connection may stay silent (a client that never sends its body frees its thread)

        def send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            if urlparse(self.path).path == "/health":
                self.send_json(HTTPStatus.OK, service.health())
            else:
                self.send_json(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /search"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            try:
                if url.path != "/search":
                    raise RequestError("POST /search", HTTPStatus.NOT_FOUND)
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise RequestError("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
                if int(length) > service.max_bytes:
                    self.close_connection = True  # the body is not read: the connection cannot be reused
                    raise RequestError(
                        f"body of {int(length)} bytes over the limit of {service.max_bytes} (--max-request-bytes)",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    )
                body = self.rfile.read(int(length))
                content_type = self.headers.get("Content-Type", "")
                self.send_json(HTTPStatus.OK, service.search(body, content_type, parse_qs(url.query)))
            except RequestError as err:
                self.send_json(err.status, {"error": str(err)})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request would drown the terminal under load

    return Handler


def make_server(service: SearchService, host: str, port: int) -> ThreadingHTTPServer:
    """A threaded server on `host:port` (port 0: one the system picks; read it from server_address).
    Each request's search runs on one core: concurrent requests are the parallelism (FAISS's own
    threads per query, times the clients, would oversubscribe the cores)."""
    faiss_module().omp_set_num_threads(1)
    server = ThreadingHTTPServer((host, port), handler_for(service))
    server.daemon_threads = True
    return server
