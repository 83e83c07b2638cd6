"""A local stand-in for the Hugging Face hub, for download tests.

Serves model directories with the hub's routes on 127.0.0.1:
- `GET /api/models/{org}/{name}/revision/{rev}` — the listing with sizes, git blob ids and,
  for LFS files (`*.safetensors`, `*.gguf`), their SHA-256;
- `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}` — plain files answered directly (`ETag` = git
  blob id); LFS files redirected (302 with `X-Linked-Size`/`X-Linked-Etag`) to `/cdn/{sha256}`,
  which honours `Range: bytes=N-` and `Range: bytes=N-M`.
It logs every request with the body bytes it sent, and can cut a transfer midway, corrupt a
file, hide a file, demand a token, or list bare file names (as some mirrors do, so that sizes
and hashes come from `HEAD`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    """One request the hub answered."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    served: int = 0  # body bytes sent


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class FakeHub:
    """The hub's state: repositories, faults to inject and the request log."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # files whose next transfer breaks off midway
    corrupt: set[str] = field(default_factory=set)
    missing_files: set[str] = field(default_factory=set)
    token: str | None = None
    bare_listing: bool = False
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, model_dir: Path) -> None:
        """Serves the top-level files of `model_dir` as `repo_id`."""
        files = {}
        for path in sorted(model_dir.iterdir()):
            if path.is_file():
                lfs = path.suffix in (".safetensors", ".gguf")
                files[path.name] = HubFile(path.name, path.read_bytes(), lfs)
        self.repos[repo_id] = files

    def by_sha(self, sha: str) -> HubFile | None:
        for files in self.repos.values():
            for f in files.values():
                if f.lfs and f.sha256 == sha:
                    return f
        return None

    def file_gets(self, name: str) -> list[Request]:
        """GETs that fetched bytes of the file called `name`: from the CDN for LFS files (their
        `resolve` GET only redirects), from `resolve` for the others."""
        blobs = {
            f"/cdn/{f.sha256}" for files in self.repos.values() for f in files.values() if f.path == name and f.lfs
        }
        with self.lock:
            gets = [r for r in self.requests if r.method == "GET"]
        if blobs:
            return [r for r in gets if r.path in blobs]
        return [r for r in gets if r.path.split("?", 1)[0].endswith(f"/resolve/{COMMIT}/{name}")]

    def served_bytes(self, name: str) -> int:
        """Body bytes sent of the file called `name`, over all its GETs."""
        return sum(r.served for r in self.file_gets(name))

    def fetched_weights(self) -> set[str]:
        """Names of the safetensors files whose bytes were fetched."""
        names = {f.path for files in self.repos.values() for f in files.values() if f.lfs}
        return {n for n in names if self.file_gets(n)}

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    logged: Request  # the request being answered, as logged

    def log_message(self, format: str, *args: object) -> None:
        return

    def _record(self) -> None:
        self.logged = Request(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        with self.hub.lock:
            self.hub.requests.append(self.logged)

    def _authorized(self) -> bool:
        if self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this model is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._record()
        self._serve(head=True)

    def do_GET(self) -> None:
        self._record()
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/cdn/"):
            self._cdn(path.removeprefix("/cdn/"), head)
            return
        if path.startswith("/api/models/"):
            self._listing(path.removeprefix("/api/models/"))
            return
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self._empty(404)
            return
        repo_id, name = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
        if not self._authorized():
            return
        file = self.hub.repos.get(repo_id, {}).get(name)
        if file is None or name in self.hub.missing_files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if repo_id in self.hub.repos else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if file.lfs:
            self.send_response(302)
            self.send_header("Location", f"{self.hub.url}/cdn/{file.sha256}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Size", str(len(file.data)))
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._body(file, head, f'"{file.git_sha1}"')

    def _listing(self, rest: str) -> None:
        parts = rest.split("/")
        if len(parts) != 4 or parts[2] != "revision":
            self._empty(404)
            return
        repo_id = f"{parts[0]}/{parts[1]}"
        if not self._authorized():
            return
        files = self.hub.repos.get(repo_id)
        if files is None:
            self.send_response(401 if self.hub.token is None else 404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        siblings = []
        for f in files.values():
            entry: dict[str, object] = {"rfilename": f.path, "size": len(f.data), "blobId": f.git_sha1}
            if self.hub.bare_listing:
                entry = {"rfilename": f.path}
            elif f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _cdn(self, sha: str, head: bool) -> None:
        file = self.hub.by_sha(sha)
        if file is None:
            self._empty(404)
            return
        self._body(file, head, f'"{file.sha256}"')

    def _body(self, file: HubFile, head: bool, etag: str) -> None:
        data = file.data
        if file.path in self.hub.corrupt:
            middle = len(data) // 2  # past any header, so that only a hash tells
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
        start, end = 0, len(data)
        requested = self.headers.get("Range")
        if requested:
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last) + 1, len(data)) if last else len(data)
            if start >= len(data):
                self._empty(416)
                return
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        cut = False
        with self.hub.lock:
            if file.path in self.hub.cut_once:
                self.hub.cut_once.discard(file.path)
                cut = True
        if cut:
            body = data[start : start + (end - start) // 2]
            self.wfile.write(body)
            self.wfile.flush()
            self.logged.served = len(body)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data[start:end])
        self.logged.served = end - start


class FakeHubServer:
    """Runs a `FakeHub` on 127.0.0.1 with a free port in a background thread."""

    def __init__(self) -> None:
        self.hub = FakeHub()
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.hub.url

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
