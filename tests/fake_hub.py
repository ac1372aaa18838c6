"""A stateful fake of the Hub's HTTP API behind huggingface_hub's own client.

``huggingface_hub.set_client_factory`` gets an ``httpx2.Client`` on an ``httpx2.MockTransport``: every
request huggingface_hub (and ``datasets``) sends goes through their own logic (folder walking, preupload,
commit payloads, revisions, pull requests, retries) and ends here instead of on the network. Files are
kept per repo and ref; the commit endpoint decodes huggingface_hub's NDJSON payload, so tests see exactly
the bytes that would have been uploaded. hf_xet's storage protocol is out of reach (its Rust client has its
own HTTP stack): with xet on (huggingface_hub's default when hf_xet is installed) the preupload endpoint
answers every file "regular" (inline base64 in the commit); with ``xet=False`` (``HF_HUB_DISABLE_XET``,
huggingface_hub's documented switch) it answers "lfs" for weights and parquet shards, as the Hub's default
.gitattributes do, and the fake serves the LFS batch API and the upload PUTs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx2
import huggingface_hub
from huggingface_hub import constants

ENDPOINT = constants.ENDPOINT
USER = "fake-user"
LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".png")


REPO_API = r"/api/(?P<type>model|dataset)s/(?P<repo>[^/]+/[^/]+)"  # one repo's API prefix
# (handler method, HTTP methods, path pattern whose named groups become its keyword arguments)
ROUTES = [
    ("create", "POST", r"/api/repos/create"),
    ("validate", "POST", r"/api/validate-yaml"),
    ("branch", "POST", REPO_API + r"/branch/(?P<rev>.+)"),
    ("preupload", "POST", REPO_API + r"/preupload/(?P<rev>.+)"),
    ("commit", "POST", REPO_API + r"/commit/(?P<rev>.+)"),
    ("discussion", "POST", REPO_API + r"/discussions"),
    ("discussion_details", "GET", REPO_API + r"/discussions/(?P<num>\d+)"),
    ("paths_info", "POST", REPO_API + r"/paths-info/(?P<rev>.+)"),
    ("tree", "GET", REPO_API + r"/tree/(?P<rest>.+)"),
    ("info", "GET", REPO_API + r"(/revision/(?P<rev>.+))?"),
    ("lfs_batch", "POST", r"/(?P<prefix>datasets/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch"),
    ("lfs_put", "PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})"),
    ("resolve", "GET|HEAD", r"/(?P<prefix>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rest>.+)"),
]


@dataclass
class Commit:
    repo_id: str
    repo_type: str
    revision: str
    message: str
    files: dict[str, bytes]
    deleted: list[str]
    oid: str
    parent: str | None


@dataclass
class Repo:
    repo_type: str
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


class FakeHub:
    """Records requests, repos and commits; ``fail[endpoint] = [status, ...]`` answers the next calls of an
    endpoint (``create``, ``preupload``, ``commit``, ...) with those statuses."""

    def __init__(self, lfs: bool = False) -> None:
        self.lfs = lfs
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[Commit] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.pulls: dict[tuple[str, str], list[dict]] = {}
        self.fail: dict[str, list[int]] = {}

    # -- plumbing -----------------------------------------------------------------------------------

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle), follow_redirects=True)

    @staticmethod
    def _json(status: int, body, headers: dict | None = None) -> httpx2.Response:
        return httpx2.Response(status, json=body, headers=headers or {})

    @staticmethod
    def _not_found(code: str = "RepoNotFound") -> httpx2.Response:
        return httpx2.Response(404, json={"error": code}, headers={"X-Error-Code": code, "X-Error-Message": code})

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        request.read()  # streamed bodies (LFS PUTs of file objects)
        path = unquote(request.url.raw_path.decode().split("?")[0])
        self.requests.append((request.method, path))
        for name, methods, pattern in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and request.method in methods.split("|"):
                if self.fail.get(name):
                    status = self.fail[name].pop(0)
                    return httpx2.Response(status, json={"error": f"injected {status}"})
                groups = match.groupdict()
                if name in ("resolve", "lfs_batch"):
                    groups["type"] = "dataset" if groups.pop("prefix") else "model"
                return getattr(self, name)(request, **groups)
        return httpx2.Response(501, json={"error": f"fake hub: no route for {request.method} {path}"})

    def _ref(self, repo: Repo, revision: str | None) -> tuple[str, dict[str, bytes]] | None:
        revision = revision or "main"
        for ref, sha in repo.heads.items():
            if revision in (ref, sha):
                return ref, repo.refs[ref]
        return None

    # -- endpoints ----------------------------------------------------------------------------------

    def create(self, request):
        body = json.loads(request.content)
        self.created.append(body)
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        if (repo_type, repo_id) in self.repos:
            return self._json(409, {"error": "You already created this repo", "url": f"{ENDPOINT}/{prefix}{repo_id}"})
        self.repos[(repo_type, repo_id)] = Repo(repo_type, body.get("visibility") == "private")
        return self._json(200, {"url": f"{ENDPOINT}/{prefix}{repo_id}", "name": repo_id})

    def validate(self, request):
        return self._json(200, {"errors": [], "warnings": []})

    def branch(self, request, type, repo, rev):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        self.branches.append((repo, rev))
        if rev in found.refs:
            return self._json(409, {"error": "Reference already exists"})
        found.refs[rev] = dict(found.refs["main"])
        found.heads[rev] = found.heads["main"]
        return self._json(200, {})

    def preupload(self, request, type, repo, rev):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        if self._ref(found, rev) is None and not rev.startswith("refs/pr/"):
            return self._not_found("RevisionNotFound")
        files = json.loads(request.content)["files"]
        mode = lambda name: "lfs" if self.lfs and name.endswith(LFS_SUFFIXES) else "regular"  # noqa: E731
        return self._json(200, {"files": [{"path": f["path"], "uploadMode": mode(f["path"]), "shouldIgnore": False, "oid": None} for f in files],
                                "commitOid": found.heads.get(rev, "0" * 40)})

    def commit(self, request, type, repo, rev):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        ref = self._ref(found, rev)
        if ref is None:
            return self._not_found("RevisionNotFound")
        ref_name, files = ref
        parent = header.get("parentCommit")
        if parent and parent != found.heads[ref_name]:
            return self._json(412, {"error": "parent commit mismatch"})
        added, deleted = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.blobs:
                    return self._json(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                added[value["path"]] = self.blobs[value["oid"]]
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
            else:
                return self._json(400, {"error": f"fake hub: unsupported operation {line['key']}"})
        pr_url = None
        if request.url.params.get("create_pr") == "1":  # a new PR ref on top of the target
            num = self._open_pull(type, repo, header["summary"], ref_name)
            ref_name = f"refs/pr/{num}"
            found.refs[ref_name], found.heads[ref_name] = dict(files), found.heads["main"]
            files = found.refs[ref_name]
            pr_url = f"{ENDPOINT}/{'' if type == 'model' else type + 's/'}{repo}/discussions/{num}"
        files.update(added)
        for name in deleted:
            files.pop(name, None)
        oid = hashlib.sha1(request.content + str(len(self.commits)).encode()).hexdigest()
        found.heads[ref_name] = oid
        self.commits.append(Commit(repo, type, ref_name, header["summary"], added, deleted, oid, parent))
        prefix = "" if type == "model" else f"{type}s/"
        return self._json(200, {"commitUrl": f"{ENDPOINT}/{prefix}{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url})

    def lfs_batch(self, request, type, repo):
        if self._repo(type, repo) is None:
            return self._not_found()
        objects = json.loads(request.content)["objects"]
        return self._json(200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{ENDPOINT}/lfs-upload/{o['oid']}"}}}
            for o in objects
        ]})

    def lfs_put(self, request, oid):
        if hashlib.sha256(request.content).hexdigest() != oid:
            return self._json(400, {"error": "sha256 mismatch"})
        self.blobs[oid] = request.content
        return self._json(200, {})

    def _open_pull(self, type, repo, title, base) -> int:
        pulls = self.pulls.setdefault((type, repo), [])
        pulls.append({"title": title, "base": base})
        return len(pulls)

    def discussion(self, request, type, repo):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        body = json.loads(request.content)
        num = self._open_pull(type, repo, body["title"], "main")
        found.refs[f"refs/pr/{num}"], found.heads[f"refs/pr/{num}"] = dict(found.refs["main"]), found.heads["main"]
        return self._json(200, {"num": num})

    def discussion_details(self, request, type, repo, num):
        pull = self.pulls[(type, repo)][int(num) - 1]
        return self._json(200, {
            "title": pull["title"], "num": int(num), "author": {"name": USER}, "createdAt": "2026-01-01T00:00:00.000Z",
            "status": "draft", "repo": {"name": repo, "type": type}, "isPullRequest": True, "events": [],
            "changes": {"base": f"refs/heads/{pull['base']}"}, "filesWithConflicts": [],
        })

    def info(self, request, type, repo, rev=None):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        ref = self._ref(found, rev)
        if ref is None:
            return self._not_found("RevisionNotFound")
        ref_name, files = ref
        return self._json(200, {"id": repo, "sha": found.heads[ref_name], "private": found.private,
                                "siblings": [{"rfilename": name} for name in sorted(files)]})

    def _entries(self, files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        entries, dirs = [], set()
        for name, content in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    dirs.add(prefix + "/".join(parts[: i + 1]))
            entries.append({"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()})
        return [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)] + entries

    def tree(self, request, type, repo, rest):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        rev, _, folder = rest.partition("/")
        ref = self._ref(found, rev)
        if ref is None:
            return self._not_found("RevisionNotFound")
        entries = self._entries(ref[1], folder, request.url.params.get("recursive") in ("1", "true", "True"))
        if folder and not entries:
            return self._not_found("EntryNotFound")
        return self._json(200, entries)

    def paths_info(self, request, type, repo, rev):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        ref = self._ref(found, rev)
        if ref is None:
            return self._not_found("RevisionNotFound")
        files = ref[1]
        body = request.content.decode()
        try:
            paths = json.loads(body)["paths"]
        except ValueError:
            from urllib.parse import parse_qs

            paths = parse_qs(body).get("paths", [])
        out = []
        for name in paths:
            if name in files:
                out.append({"type": "file", "path": name, "size": len(files[name]), "oid": hashlib.sha1(files[name]).hexdigest()})
            elif any(f.startswith(name.rstrip("/") + "/") for f in files):
                out.append({"type": "directory", "path": name, "oid": "0" * 40})
        return self._json(200, out)

    def resolve(self, request, type, repo, rest):
        found = self._repo(type, repo)
        if found is None:
            return self._not_found()
        for ref_name, sha in found.heads.items():  # refs may contain slashes (refs/pr/1)
            for candidate in (ref_name, sha):
                if rest.startswith(candidate + "/"):
                    name = rest[len(candidate) + 1:]
                    files = found.refs[ref_name]
                    if name not in files:
                        return self._not_found("EntryNotFound")
                    content = files[name]
                    headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                               "Content-Length": str(len(content))}
                    return httpx2.Response(200, content=b"" if request.method == "HEAD" else content, headers=headers)
        return self._not_found("RevisionNotFound")


@contextlib.contextmanager
def fake_hub(monkeypatch, token: str | None = "hf_fake_token", xet: bool = True):
    """Route huggingface_hub's HTTP client to a :class:`FakeHub` (offline mode off, a token in HF_TOKEN;
    ``xet=False``: HF_HUB_DISABLE_XET, files uploaded through the LFS protocol)."""
    from huggingface_hub.utils import _http

    hub = FakeHub(lfs=not xet)
    previous = _http._GLOBAL_CLIENT_FACTORY
    with monkeypatch.context() as patch:  # undone when the block ends
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
        if token is None:
            patch.delenv("HF_TOKEN", raising=False)
        else:
            patch.setenv("HF_TOKEN", token)
        huggingface_hub.set_client_factory(hub.client)
        try:
            yield hub
        finally:
            huggingface_hub.set_client_factory(previous)
