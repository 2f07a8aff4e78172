"""A local stand-in for the Hugging Face Hub's file API, and a plain file server, for tests.

huggingface_hub talks to whatever HF_ENDPOINT names; this server answers the two requests hf_hub_download
makes (HEAD, then GET with Range to resume) the way the Hub does, so downloads run the real client code.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, str] = {}  # repo id -> its commit hash
        self.files: dict[tuple[str, str], bytes] = {}  # (repo id, filename) -> content
        self.etags: dict[tuple[str, str], str] = {}  # ETags that differ from the content's sha256
        self.pages: dict[str, tuple[int, bytes]] = {}  # any other path -> (status, body)
        self.drop_once: set[tuple[str, str]] = set()  # cut the next full GET of these half-way
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_file(self, repo_id: str, filename: str, data: bytes, commit: str = "a" * 40) -> None:
        self.repos[repo_id] = commit
        self.files[(repo_id, filename)] = data

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub: LocalHub = self.server.hub
        path = urlsplit(self.path).path
        hub.requests.append((self.command, path, self.headers.get("Range")))
        if "/resolve/" not in path:
            status, data = hub.pages.get(path, (404, b"not found"))
            self._send(status, {"Content-Type": "application/octet-stream"}, data if body else b"")
            return
        # /{repo_id}/resolve/{revision}/{filename}
        repo_id, rest = path[1:].split("/resolve/", 1)
        revision, filename = (unquote(part) for part in rest.split("/", 1))
        commit = hub.repos.get(repo_id)
        if commit is None:
            self._send(404, {"X-Error-Code": "RepoNotFound"}, b"")
            return
        if revision not in (commit, "main"):
            self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"")
            return
        data = hub.files.get((repo_id, filename))
        if data is None:
            self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"")
            return
        headers = {
            "X-Repo-Commit": commit,
            # The Hub's ETag of an LFS file is its sha256.
            "ETag": f'"{hub.etags.get((repo_id, filename)) or hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, start = 200, 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and range_header.endswith("-"):
            start = int(range_header[len("bytes=") : -1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not body:
            headers["Content-Length"] = str(len(data))
            self._send(status, headers, b"")
            return
        if status == 200 and (repo_id, filename) in hub.drop_once:
            hub.drop_once.discard((repo_id, filename))
            self._drop_half_way(headers, data)
            return
        self._send(status, headers, data[start:])

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drop_half_way(self, headers: dict[str, str], data: bytes) -> None:
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
