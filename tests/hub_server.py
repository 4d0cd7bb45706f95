"""A small, in-memory stand-in for the Hugging Face Hub, for the tests.

It speaks the part of the Hub's HTTP API that `huggingface_hub` uses to create a model repository, commit files (inline
or through the basic LFS transfer) and download them. Point a process at it with `HF_ENDPOINT=<server.url>` and
`HF_HUB_DISABLE_XET=1`. Writes need `Authorization: Bearer <token>`; reads work anonymously, as for a public repo; a
wrong token is refused everywhere with 401. Each commit replaces the snapshot of its branch (`main`, or one made with
`create_branch` from `main`).
"""

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
# Suffixes committed through LFS; the real Hub decides by .gitattributes and size, the client follows its answer.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def new_commit_sha() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]  # 40 hex digits, like a git commit id


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = field(default_factory=new_commit_sha)


class HubError(Exception):
    """An error answer: HTTP status, message, and the `X-Error-Code` huggingface_hub maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """`with HubServer(token="hf_...") as hub:` serves on `hub.url` (127.0.0.1, a free port) in a daemon thread."""

    def __init__(self, token: str, user: str = "user"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}  # their `main` branch
        self.branches: dict[tuple[str, str], Repo] = {}  # (repo id, branch) -> the other branches
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded before the commit that uses it
        self.log: list[str] = []  # "METHOD path status", to debug a failing test
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo(self, repo_id: str, revision: str = "main") -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if revision in ("main", repo.sha):
            return repo
        for (branch_repo, name), branch in self.branches.items():
            if branch_repo == repo_id and revision in (name, branch.sha):
                return branch
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    # (method, path pattern, handler): the first full match wins.
    ROUTES = (
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", "model_info"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    )
    WRITES = ("create_repo", "create_branch", "preupload", "commit", "lfs_batch")

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("GET", head=True)

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def dispatch(self, method: str, head: bool = False) -> None:
        self.head = head
        path = unquote(urlsplit(self.path).path)
        try:
            body = self.read_body()
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    self.authorize(write=name in self.WRITES)
                    with self.hub.lock:
                        getattr(self, name)(body, **{k: v for k, v in match.groupdict().items() if v is not None})
                    return
            raise HubError(404, f"No route for {method} {path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})}
            self.send_json({"error": error.message}, error.status, headers)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the CRLF after the last, empty chunk
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def authorize(self, write: bool) -> None:
        given = self.headers.get("Authorization")
        if given is not None and given != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        if given is None and write:
            raise HubError(401, "You must be authenticated to write to the Hub")

    def send_json(self, payload: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def send_bytes(self, content: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**(headers or {}), "Content-Length": str(len(content))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not self.head:
            self.wfile.write(content)

    def log_message(self, format: str, *args) -> None:  # keep the test output clean; keep a record instead
        self.hub.log.append(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}")

    # ---- the API ----

    def create_repo(self, body: bytes) -> None:
        request = json.loads(body)
        if request.get("type", "model") != "model":
            raise HubError(400, "This test Hub only hosts model repositories")
        repo_id = f"{request.get('organization') or self.hub.user}/{request['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # huggingface_hub reads the url from this 409 answer too (exist_ok=True)
            self.send_json({"error": "You already created this model repo", "url": url}, 409)
            return
        self.hub.repos[repo_id] = Repo()
        self.send_json({"url": url, "name": repo_id})

    def create_branch(self, body: bytes, repo: str, branch: str) -> None:
        main = self.hub.repo(repo)
        if branch == "main" or (repo, branch) in self.hub.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        self.hub.branches[(repo, branch)] = Repo(files=dict(main.files))
        self.send_json({})

    def validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            self.send_json({"errors": [{"message": f"Invalid YAML: {error}"}]}, 400)
            return
        if not isinstance(metadata, dict):
            self.send_json({"errors": [{"message": "The metadata must be a YAML mapping"}]}, 400)
            return
        self.send_json({"errors": [], "warnings": []})

    def model_info(self, body: bytes, repo: str, revision: str = "main") -> None:
        snapshot = self.hub.repo(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(snapshot.files)]
        self.send_json({"id": repo, "modelId": repo, "sha": snapshot.sha, "private": False, "siblings": siblings})

    def tree(self, body: bytes, repo: str, revision: str, path: str = "") -> None:
        # Every file under `path`, recursively: enough for flat repositories like ours.
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files = self.hub.repo(repo, revision).files
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for name, content in sorted(files.items())
            if name.startswith(prefix)
        ]
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        self.send_json(entries)

    def preupload(self, body: bytes, repo: str, revision: str) -> None:
        self.hub.repo(repo, revision)
        files = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
            for f in json.loads(body)["files"]
        ]
        self.send_json({"files": [{**f, "shouldIgnore": False} for f in files]})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        self.hub.repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:  # no "actions": the client skips the upload
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}"}}
            objects.append(answer)
        self.send_json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def lfs_upload(self, body: bytes, oid: str) -> None:
        # Like a pre-signed storage URL: no token, but the content must match the announced sha256.
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "The uploaded content does not match its sha256")
        self.hub.lfs_objects[oid] = body
        self.send_bytes(b"")

    def commit(self, body: bytes, repo: str, revision: str) -> None:
        snapshot = self.hub.repo(repo, revision)
        files = dict(snapshot.files)
        for line in body.splitlines():
            key, value = (item := json.loads(line))["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {
                    name: data for name, data in files.items() if not name.startswith(value["path"].rstrip("/") + "/")
                }
        snapshot.files, snapshot.sha = files, new_commit_sha()
        self.send_json({"commitUrl": f"{self.hub.url}/{repo}/commit/{snapshot.sha}", "commitOid": snapshot.sha})

    def resolve(self, body: bytes, repo: str, revision: str, path: str) -> None:
        snapshot = self.hub.repo(repo, revision)
        if path not in snapshot.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = snapshot.files[path]
        headers = {
            "X-Repo-Commit": snapshot.sha,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self.send_bytes(content, headers=headers)
