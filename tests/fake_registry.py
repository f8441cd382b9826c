"""A fake container registry (the manifest HEAD of the Docker Registry HTTP API v2) on loopback,
optionally behind the bearer-token challenge real registries use, for `submit`'s image check."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeRegistry:
    """`with FakeRegistry({"mofe-ood:test"}, token=True) as registry:` images at `registry.host`."""

    def __init__(self, present: set[str], token: bool = False):
        self.present, self.token = present, token
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                if outer.token and self.headers.get("Authorization") != "Bearer t0ken":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="http://{outer.host}/token",'
                                                         f'service="fake",scope="repository:x:pull"')
                    return self.end_headers()
                _, v2, repository, manifests, reference = (self.path.split("/", 2)[:2]
                                                           + self.path.split("/", 2)[2].rsplit("/", 2))
                found = v2 == "v2" and manifests == "manifests" and f"{repository}:{reference}" in outer.present
                self.send_response(200 if found else 404)
                self.end_headers()

            def do_GET(self):
                body = b'{"token": "t0ken"}'
                self.send_response(200 if self.path.startswith("/token?service=fake") else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeRegistry":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
