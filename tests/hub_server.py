"""A Hub-protocol server on 127.0.0.1 for tests: the endpoints the real huggingface_hub client
calls to create a repo, pre-upload LFS files, commit, list, and download, with fault injection.

It keeps repos, commits and LFS objects in memory, logs every request with its time, counts
completed LFS uploads per object, and can answer a matching request with an error status,
drop the connection, delay it, or process it and then withhold the answer until released.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_BATCH = ["info", "lfs", "objects", "batch"]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    size: int
    lfs: str | None  # the sha256 of an LFS file
    content: bytes = b""  # a regular file's bytes

    @property
    def oid(self) -> str:
        return git_blob_id(lfs_pointer(self.lfs, self.size) if self.lfs else self.content)

    def sibling(self, path: str) -> dict[str, Any]:
        item: dict[str, Any] = {"rfilename": path, "size": self.size, "blobId": self.oid}
        if self.lfs:
            item["lfs"] = {"sha256": self.lfs, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs, self.size))}
        return item

    def tree(self, path: str) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            item["lfs"] = {"oid": self.lfs, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs, self.size))}
        return item


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Entry]


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256


@dataclass
class Fault:
    """``action``: an HTTP status (e.g. 500), ``"drop"`` (close without an answer), ``"delay"``
    (sleep ``seconds`` first) or ``"hang"`` (process, then hold the answer until released)."""

    method: str
    path_contains: str
    action: int | str
    times: int = 1
    seconds: float = 0.0
    whole: bool = False  # only requests for a whole file (no Range header): downloads, not header reads
    body_contains: bytes = b""  # only requests whose body holds these bytes


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[tuple[float, str, str, int]] = []
        self.uploads: dict[str, int] = {}  # completed LFS PUTs per object id
        self.commits_made = 0
        self.hung = threading.Event()
        self.hung_port = 0  # the client's port of the request held by a "hang" fault
        self.release = threading.Event()
        self.lock = threading.Lock()

    def take_fault(self, method: str, path: str, ranged: bool, body: bytes = b"") -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if (fault.whole and ranged) or fault.body_contains not in body:
                    continue
                if fault.times > 0 and fault.method == method and fault.path_contains in path:
                    fault.times -= 1
                    return fault
        return None

    def head(self, repo_id: str, revision: str) -> Commit | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        oid = repo.branches.get(revision, revision)
        return repo.commits.get(oid)

    def new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, Entry]) -> Commit:
        parent = repo.branches.get(branch)
        commit = Commit(hashlib.sha1(uuid.uuid4().bytes).hexdigest(), parent, message, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


def _not_found(what: str = "Repository not found") -> _Reply:
    return _Reply(404, {"error": what}, {"X-Error-Code": "RepoNotFound" if "Repository" in what else "EntryNotFound"})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the state keeps a log
        return

    @property
    def state(self) -> HubState:
        return self.server.state

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        body = self._body() if method in ("POST", "PUT") else b""
        fault = self.state.take_fault(method, path, "Range" in self.headers, body)
        if fault is not None and fault.action == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.action == "drop":
            self._log(method, path, 0)
            self.close_connection = True
            return
        if fault is not None and isinstance(fault.action, int):
            self._send(method, path, _Reply(fault.action, {"error": "injected fault"}))
            return
        try:
            reply = self._route(method, url.path, path, parse_qs(url.query), body)
        except _Reply as answer:
            reply = answer
        if fault is not None and fault.action == "hang":
            self._log(method, path, -1)
            self.state.hung_port = int(self.client_address[1])
            self.state.hung.set()
            self.state.release.wait(60)
            self.close_connection = True
            return
        self._send(method, path, reply)

    def _log(self, method: str, path: str, status: int) -> None:
        with self.state.lock:
            self.state.log.append((time.time(), method, path, status))

    def _send(self, method: str, path: str, reply: _Reply) -> None:
        self._log(method, path, reply.status)
        if isinstance(reply.body, bytes):
            data = reply.body
        elif reply.body is None:
            data = b""
        else:
            data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        if "Content-Length" not in headers:
            headers["Content-Length"] = str(len(data))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _auth(self, write: bool) -> bool:
        header = self.headers.get("Authorization")
        if header is None:
            if write:
                raise _Reply(401, {"error": "You must be authenticated to access this resource"})
            return False
        if header != f"Bearer {self.state.token}":
            raise _Reply(401, {"error": "Invalid credentials in Authorization header"})
        return True

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authed = self._auth(write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not authed):
            raise _not_found()
        return repo

    def _route(self, method: str, raw: str, path: str, query: dict[str, list[str]], body: bytes) -> _Reply:
        parts = [unquote(part) for part in raw.strip("/").split("/")]
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return _Reply(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4] if len(parts) > 4 else "", parts[5:]
            return self._api(method, repo_id, action, rest, body)
        if method == "POST" and parts[1:2] and parts[1].endswith(".git") and parts[2:] == LFS_BATCH:
            return self._batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[0] == "lfs-upload" and method == "PUT":
            return self._put(f"{parts[1]}/{parts[2]}", parts[3], body)
        if parts[0] == "lfs-verify" and method == "POST":
            repo = self._repo(f"{parts[1]}/{parts[2]}", write=True)
            return _Reply(200, {}) if parts[3] in repo.objects else _Reply(404, {"error": "object not found"})
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _Reply(404, {"error": f"no route for {method} {path}"})

    def _create(self, payload: dict[str, Any]) -> _Reply:
        self._auth(write=True)
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return _Reply(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            entry = Entry(len(attributes), None, attributes)
            self.state.new_commit(repo, "main", "initial commit", {".gitattributes": entry})
            self.state.repos[repo_id] = repo
        return _Reply(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _api(self, method: str, repo_id: str, action: str, rest: list[str], body: bytes) -> _Reply:
        write = method == "POST" and action in ("preupload", "commit", "branch")
        repo = self._repo(repo_id, write=write)
        revision = rest[0] if rest else "main"
        if action == "branch" and method == "POST":
            with self.state.lock:
                if revision in repo.branches:
                    return _Reply(409, {"error": "Reference already exists"})
                repo.branches[revision] = repo.branches["main"]
            return _Reply(200, {})
        if action == "commit" and method == "POST":
            return self._commit(repo_id, repo, revision, body)
        head = self.state.head(repo_id, revision)
        if head is None:
            raise _Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        if action == "preupload":
            files = json.loads(body)["files"]
            answer = []
            for item in files:
                lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > LFS_THRESHOLD
                known = head.files.get(item["path"])
                answer.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": (known.lfs or known.oid) if known else None,
                    }
                )
            return _Reply(200, {"files": answer, "commitOid": head.oid})
        if action in ("", "revision"):
            siblings = [entry.sibling(name) for name, entry in sorted(head.files.items())]
            return _Reply(200, {"id": repo_id, "sha": head.oid, "private": repo.private, "siblings": siblings})
        if action == "tree":
            prefix = "/".join(rest[1:])
            items = [entry.tree(name) for name, entry in sorted(head.files.items()) if name.startswith(prefix)]
            return _Reply(200, items)
        if action == "paths-info" and method == "POST":
            paths = parse_qs(body.decode()).get("paths", [])
            return _Reply(200, [head.files[p].tree(p) for p in paths if p in head.files])
        raise _Reply(404, {"error": f"no route for {action}"})

    def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> _Reply:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        with self.state.lock:
            if branch not in repo.branches:
                raise _Reply(404, {"error": f"Invalid rev id: {branch}"}, {"X-Error-Code": "RevisionNotFound"})
            parent = repo.branches[branch]
            if header.get("parentCommit") not in (None, parent):
                raise _Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
            files = dict(repo.commits[parent].files)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = Entry(len(content), None, content)
                elif line["key"] == "lfsFile":
                    if value["oid"] not in repo.objects:
                        raise _Reply(422, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"})
                    files[value["path"]] = Entry(value["size"], value["oid"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
            commit = self.state.new_commit(repo, branch, header["summary"], files)
            self.state.commits_made += 1
        url = f"{self.server.endpoint}/{repo_id}/commit/{commit.oid}"
        return _Reply(200, {"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None})

    def _batch(self, repo_id: str, payload: dict[str, Any]) -> _Reply:
        repo = self._repo(repo_id, write=True)
        objects = []
        for item in payload["objects"]:
            answer: dict[str, Any] = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in repo.objects:
                where = f"{self.server.endpoint}/lfs-upload/{repo_id}/{item['oid']}"
                check = f"{self.server.endpoint}/lfs-verify/{repo_id}/{item['oid']}"
                answer["actions"] = {"upload": {"href": where}, "verify": {"href": check}}
            objects.append(answer)
        return _Reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _put(self, repo_id: str, oid: str, body: bytes) -> _Reply:
        repo = self.state.repos.get(repo_id)  # a pre-signed URL: no token is sent with it
        if repo is None:
            raise _not_found()
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Reply(400, {"error": "sha256 mismatch"})
        with self.state.lock:
            repo.objects[oid] = body
            self.state.uploads[oid] = self.state.uploads.get(oid, 0) + 1
        return _Reply(200, None)

    def _resolve(self, repo_id: str, revision: str, name: str) -> _Reply:
        repo = self._repo(repo_id)
        head = self.state.head(repo_id, revision)
        if head is None:
            raise _Reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        entry = head.files.get(name)
        if entry is None:
            raise _not_found("Entry not found")
        data = repo.objects[entry.lfs] if entry.lfs else entry.content
        etag = entry.lfs or entry.oid
        headers = {"X-Repo-Commit": head.oid, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and self.command == "GET":
            first, _, last = wanted[len("bytes=") :].partition("-")
            begin, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            headers.update(
                {"Content-Range": f"bytes {begin}-{end - 1}/{len(data)}", "Content-Length": str(end - begin)}
            )
            return _Reply(206, data[begin:end], {"Content-Type": "application/octet-stream", **headers})
        return _Reply(200, data, {"Content-Type": "application/octet-stream", **headers})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(token)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.release.set()
        self.shutdown()
        self.server_close()
