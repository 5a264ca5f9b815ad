"""A local stand-in for the Hugging Face Hub, for tests of downloads (`HF_ENDPOINT` at its url).

It answers what `huggingface_hub` asks: `HEAD`/`GET /{owner}/{repo}/resolve/{rev}/{file}` with
the headers it reads (`X-Repo-Commit`, `ETag`, `Content-Length`; a 404 with `X-Error-Code` for
a missing repo or file), the tree listing `GET /api/models/{owner}/{repo}/tree/{rev}`, and
`HEAD /`. Files named in `slow` are sent at the rate given, so a test sees a download in progress. Every request is
recorded (`requests`), so a test can tell whether something touched the network.
"""

import contextlib
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    """`repos`: repo id -> {file name: its bytes, or a local file to stream}; `slow`: file name ->
    bytes per second it is sent at (the others go as fast as they can)."""

    def __init__(self, repos: dict[str, dict[str, bytes | Path]], slow: dict[str, float] | None = None,
                 chunk: int = 64 * 1024) -> None:
        self.repos, self.slow, self.chunk = repos, slow or {}, chunk
        self.requests: list[str] = []  # "METHOD /path"
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                stand_in._answer(self, body=False)

            def do_GET(self) -> None:
                stand_in._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{handler.command} {handler.path}")
        path = unquote(urlparse(handler.path).path).strip("/").split("/")
        if path == [""]:
            return self._send(handler, 200, {}, b"", body)
        if path[:2] == ["api", "models"] and len(path) >= 6 and path[4] == "tree":
            files = self.repos.get(f"{path[2]}/{path[3]}")
            if files is None:
                return self._send(handler, 404, {"X-Error-Code": "RepositoryNotFound"}, b"", body)
            listing = [{"type": "file", "path": name, "size": _size(data), "oid": _etag(data)}
                       for name, data in files.items()]
            return self._send(handler, 200, {"Content-Type": "application/json"}, json.dumps(listing).encode(), body)
        if len(path) >= 5 and path[2] == "resolve":
            files = self.repos.get(f"{path[0]}/{path[1]}")
            if files is None:
                return self._send(handler, 404, {"X-Error-Code": "RepositoryNotFound"}, b"", body)
            name = "/".join(path[4:])
            if name not in files:
                return self._send(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(files[name])}"',
                       "Content-Type": "application/octet-stream"}
            return self._send(handler, 200, headers, files[name], body, self.slow.get(name))
        self._send(handler, 404, {}, b"", body)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes | Path,
              body: bool, bytes_per_second: float | None = None) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(_size(data))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if not body:
            return
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open(data, "rb")) if isinstance(data, Path) else io.BytesIO(data)
            while piece := source.read(self.chunk):
                handler.wfile.write(piece)
                handler.wfile.flush()
                if bytes_per_second:
                    time.sleep(len(piece) / bytes_per_second)


def _size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def _etag(data: bytes | Path) -> str:
    # The Hub's ETag of an LFS file is its sha256; any stable digest does for the cache.
    return hashlib.sha256(str(data.resolve()).encode() if isinstance(data, Path) else data).hexdigest()


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """The url of a server that takes connections and never answers (a Hub behind a black hole)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accepted: connecting works, no byte ever comes back
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
