"""A fake Kubeflow Pipelines API server (v2beta1) for `pipeline.py submit` tests: the calls
kfp.Client makes to find or upload a pipeline and its versions, create an experiment and start
a run, with KFP's rules that matter here: names are unique per namespace (pipelines) and per
pipeline (versions), a namespace sees only its own pipelines, healthz reports `tag_name`."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class State:
    version: str = "2.14.3"                          # what healthz says
    pipelines: list = field(default_factory=list)    # {pipeline_id, display_name, namespace}
    versions: list = field(default_factory=list)     # {pipeline_id, pipeline_version_id, display_name, yaml}
    runs: list = field(default_factory=list)         # the bodies of POST /runs
    posts: list = field(default_factory=list)        # (path, query) of every POST


def name_filter(query: dict) -> str | None:
    """The display_name an EQUALS filter asks for, if any."""
    for predicate in json.loads((query.get("filter") or ["{}"])[0]).get("predicates", []):
        if predicate.get("key") == "display_name":
            return predicate.get("string_value") or predicate.get("stringValue")
    return None


class Handler(BaseHTTPRequestHandler):
    state: State

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        wanted = name_filter(query)
        if url.path.endswith("/healthz"):
            return self._reply({"multi_user": True, "tag_name": self.state.version})
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        versions = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", url.path)
        if versions:
            found = [{k: v for k, v in version.items() if k != "yaml"} for version in self.state.versions
                     if version["pipeline_id"] == versions[1] and wanted in (None, version["display_name"])]
            return self._reply({"pipeline_versions": found, "total_size": len(found)})
        if url.path == "/apis/v2beta1/pipelines":
            namespace = (query.get("namespace") or [""])[0]
            found = [p for p in self.state.pipelines
                     if p["namespace"] == namespace and wanted in (None, p["display_name"])]
            return self._reply({"pipelines": found, "total_size": len(found)})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        self.state.posts.append((url.path, query))
        if url.path == "/apis/v2beta1/pipelines/upload":
            namespace = query.get("namespace", "")
            if any(p["display_name"] == query["name"] and p["namespace"] == namespace for p in self.state.pipelines):
                return self._reply({"error": f"pipeline {query['name']} already exists"}, 409)
            pipeline = {"pipeline_id": f"pipe-{len(self.state.pipelines) + 1}", "display_name": query["name"],
                        "namespace": namespace}
            self.state.pipelines.append(pipeline)
            self._version(pipeline["pipeline_id"], query["name"], raw)  # KFP's first version: the upload
            return self._reply(pipeline)
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            pipeline_id = query["pipelineid"]
            if any(v["pipeline_id"] == pipeline_id and v["display_name"] == query["name"] for v in self.state.versions):
                return self._reply({"error": f"version {query['name']} already exists"}, 409)
            return self._reply({k: v for k, v in self._version(pipeline_id, query["name"], raw).items() if k != "yaml"})
        body = json.loads(raw or b"{}")
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if url.path == "/apis/v2beta1/runs":
            self.state.runs.append(body)
            return self._reply({"run_id": f"run-{len(self.state.runs)}", "experiment_id": body["experiment_id"],
                                "display_name": body["display_name"], "state": "PENDING"})
        self._reply({"error": "not found"}, 404)

    def _version(self, pipeline_id: str, name: str, raw: bytes) -> dict:
        text = raw.decode(errors="replace")
        start = text.find("# PIPELINE DEFINITION")  # the file's text inside the multipart body
        body = text[start:text.rfind("\r\n--")] if start >= 0 else text
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"ver-{len(self.state.versions) + 1}",
                   "display_name": name, "yaml": body}
        self.state.versions.append(version)
        return version

    def log_message(self, *args):
        pass


class FakeKFP:
    """`with FakeKFP() as kfp:` a server on loopback at `kfp.url`; its state in `kfp.state`."""

    def __init__(self, version: str = "2.14.3"):
        self.state = State(version=version)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeKFP":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.stop = threading.Timer(300, self.server.shutdown)  # bounded even if a test hangs
        self.stop.start()
        return self

    def __exit__(self, *exc):
        self.stop.cancel()
        self.server.shutdown()
        self.server.server_close()

    def version_yaml(self, version_id: str) -> str:
        return next(v["yaml"] for v in self.state.versions if v["pipeline_version_id"] == version_id)
