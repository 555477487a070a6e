"""A local fake of the Hugging Face hub: just the routes huggingface_hub uses for a snapshot download.

Serves repos from memory, honours Range (so resumes are real), can throttle one file (so a test can kill a
download mid-transfer), and records every request it gets.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, files_by_commit: dict[str, dict[str, bytes]], refs: dict[str, str], gated: bool = False):
        self.files_by_commit = files_by_commit
        self.refs = refs
        self.gated = gated

    def resolve(self, rev: str) -> str | None:
        if rev in self.files_by_commit:
            return rev
        return self.refs.get(rev)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        # filename -> (bytes sent at full speed, then seconds between 16 KiB chunks)
        self.throttle: dict[str, tuple[int, float]] = {}
        # filename -> bytes sent instead of the real content (the metadata still describes the real one)
        self.corrupt: dict[str, bytes] = {}
        self.omit: set[str] = set()  # metadata model_info leaves out of every file: "size", "blobId"
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None, gated: bool = False,
                 branch: str = "main") -> str:
        commit = commit or hashlib.sha1(repo_id.encode() + str(len(files)).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}, gated))
        repo.files_by_commit[commit] = files
        repo.refs[branch] = commit
        return commit

    # ---------------------------------------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"])
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}, head)

    def _handle(self, h, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append({"method": h.command, "path": path, "range": h.headers.get("Range"),
                                  "auth": h.headers.get("Authorization")})
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
        if m:
            return self._info(h, m.group(1), m.group(2) or "main", head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._file(h, m.group(1), m.group(2), m.group(3), head)
        self._error(h, 404, "EntryNotFound", head)

    def _check(self, h, repo_id: str, head: bool):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", head)
            return None
        if repo.gated and h.headers.get("Authorization") != "Bearer hf_good":
            self._error(h, 403 if h.headers.get("Authorization") else 401, "GatedRepo", head)
            return None
        return repo

    def _info(self, h, repo_id: str, rev: str, head: bool) -> None:
        repo = self._check(h, repo_id, head)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        files = repo.files_by_commit[commit]
        body = json.dumps({
            "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
            "siblings": [self._sibling(n, b) for n, b in files.items()],
        }).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"}, head)

    def _sibling(self, name: str, data: bytes) -> dict:
        """What the hub says of a file: git's blob id; for LFS files (weights) also their sha256."""
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        item = {"rfilename": name, "size": len(data), "blobId": blob}
        if name.endswith((".safetensors", ".bin", ".onnx")):
            item["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        for key in self.omit:
            item.pop(key, None)
        return item

    def _file(self, h, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._check(h, repo_id, head)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        data = repo.files_by_commit[commit].get(name)
        if data is None:
            return self._error(h, 404, "EntryNotFound", head)
        data = self.corrupt.get(name, data)  # what travels may differ from what the metadata promises
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = h.headers.get("Range")
        status = 200
        if rng and not head:
            mm = re.match(r"bytes=(\d+)-", rng)
            if mm:
                start = int(mm.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(data) if head else len(body))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        fast, delay = self.throttle.get(name, (0, 0.0))
        step = 16 * 1024
        try:
            for i in range(0, len(body), step):
                h.wfile.write(body[i:i + step])
                if delay and start + i >= fast:
                    h.wfile.flush()
                    time.sleep(delay)  # server-side pacing of the transfer, not test synchronisation
        except (BrokenPipeError, ConnectionResetError):
            pass
