"""The server side of `pipeline.py submit`: the backend's version, the pipeline and its
versions (named by what runs), a run.

A version is named `mofe-ood-<commit>-<IR hash>`: the same commit with other GPUs, shards,
`kfp` settings or defaults is another IR, so another version, and a run never starts an IR
other than the one compiled for it. A dirty tree's IR can change without a new commit: its
versions are never reused (each upload gets a unique suffix).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from kfpipe import backends
from mofe_ood.params import ParamError
from mofe_ood.stages import OLDEST_KFP_BACKEND

NAME = "mofe-ood"


def backend_version(host: str, token: str | None) -> tuple[int, ...] | None:
    """The KFP server's version from its healthz (`tag_name`, e.g. 2.14.3), or None if it says none."""
    for path in ("/apis/v2beta1/healthz", "/apis/v1beta1/healthz"):
        request = urllib.request.Request(host.rstrip("/") + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                found = backends.parse(json.load(response).get("tag_name") or "")
        except (OSError, ValueError):
            continue
        if found:
            return found
    return None


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_backend(package: Path, host: str, found: tuple[int, ...] | None) -> None:
    """Refuse (before any upload) an IR that needs a newer backend than the server's, naming
    each feature and both versions."""
    spec, platform = yaml.safe_load_all(Path(package).read_text())
    need = backends.needs(spec, platform)
    needed = need[0].since if need else OLDEST_KFP_BACKEND
    leave_out = f"leave them out (extract.shards: 1, kfp.backend: {OLDEST_KFP_BACKEND})"
    if found is None:
        if need:
            raise ParamError(f"the IR needs a Kubeflow Pipelines backend >= {needed} ("
                             + "; ".join(f"{f.name} needs >= {f.since}" for f in need)
                             + f"); the server at {host} does not report its version: pass --no-version-check "
                             f"if you know it is recent enough, or {leave_out}")
        print(f"pipeline.py submit: the server at {host} does not report its version; the IR runs on "
              f"backends >= {OLDEST_KFP_BACKEND}", file=sys.stderr)
        return
    if found < backends.parse(OLDEST_KFP_BACKEND):
        raise ParamError(f"the server at {host} runs KFP backend {dotted(found)}, but this project supports "
                         f"KFP backends >= {OLDEST_KFP_BACKEND} (Kubeflow 1.9): upgrade the server")
    short = [f for f in need if backends.parse(f.since) > found]
    if short:
        raise ParamError(f"the server at {host} runs KFP backend {dotted(found)}, but "
                         + "; ".join(f"{f.name} needs >= {f.since}" for f in short)
                         + f": {leave_out}, or upgrade the server")


def check_image(image: str) -> None:
    """Refuse an image a cluster cannot pull as built here: one with no registry (a cluster would
    pull docker.io/library/<name>) or with a -dirty tag (it names no commit's code)."""
    first, _, rest = image.partition("/")
    # Docker's rule: the first part names a registry when it has a dot or a port, or is localhost.
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        raise ParamError(f"image {image} names no registry, so a cluster would pull docker.io/library/"
                         f"{image.split('@')[0].rsplit(':', 1)[0]}: push the image to a registry the cluster "
                         "pulls from and set kfp.image (or $MOFE_IMAGE, --image) to REGISTRY/mofe-ood")
    if image.rsplit(":", 1)[-1].endswith("-dirty"):
        raise ParamError(f"image {image} was built from a dirty tree and names no commit's code: commit, "
                         "rebuild and push the image, then submit")


MANIFESTS = ", ".join(["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                       "application/vnd.docker.distribution.manifest.list.v2+json",
                       "application/vnd.docker.distribution.manifest.v2+json"])


def registry_credentials(host: str) -> str | None:
    """`user:password` base64 for `host` from the file `podman login` / `docker login` wrote, if any."""
    candidates = [os.environ.get("REGISTRY_AUTH_FILE"),
                  os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent", "containers", "auth.json"),
                  os.path.expanduser("~/.docker/config.json")]
    for path in filter(None, candidates):
        try:
            auths = json.loads(Path(path).read_text()).get("auths", {})
        except (OSError, ValueError):
            continue
        for name, entry in auths.items():
            if name.removeprefix("https://").removeprefix("http://").split("/")[0] == host and entry.get("auth"):
                return entry["auth"]
    return None


def image_in_registry(image: str) -> bool | None:
    """Whether `image`'s registry has its tag or digest (Docker Registry HTTP API v2: HEAD of the
    manifest, with the bearer token the registry's challenge hands out, anonymous or with the
    login's credentials); None where the registry does not say (no access, no answer)."""
    host, _, path = image.partition("/")
    repository, reference = (path.split("@", 1) if "@" in path else path.rsplit(":", 1))
    # Loopback registries (the distribution registry of a workstation) speak plain HTTP.
    scheme = "http" if host.split(":")[0] in ("localhost", "127.0.0.1") else "https"
    url = f"{scheme}://{host}/v2/{repository}/manifests/{reference}"
    basic = registry_credentials(host)
    headers = {"Accept": MANIFESTS, **({"Authorization": f"Basic {basic}"} if basic else {})}
    for attempt in ("as is", "with a token"):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="HEAD"), timeout=15):
                return True
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return False
            challenge = err.headers.get("WWW-Authenticate", "")
            token = bearer_token(challenge, basic) if err.code == 401 and attempt == "as is" else None
            if not token:
                return None
            headers = {"Accept": MANIFESTS, "Authorization": f"Bearer {token}"}
        except OSError:
            return None
    return None


def bearer_token(challenge: str, basic: str | None) -> str | None:
    """The token a registry's `WWW-Authenticate: Bearer realm=...,service=...,scope=...` hands out."""
    if not challenge.lower().startswith("bearer "):
        return None
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
    request = urllib.request.Request(f"{fields.get('realm', '')}?{query}",
                                     headers={"Authorization": f"Basic {basic}"} if basic else {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = json.load(response)
    except (OSError, ValueError):
        return None
    return body.get("token") or body.get("access_token")


def version_name(package: Path, commit: str) -> str:
    """`mofe-ood-<commit>-<first 10 hex of the IR's sha256>`; a dirty tree's gets a unique suffix."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:10]
    name = f"{NAME}-{commit}-{digest}"
    if commit.endswith("-dirty"):
        name += "-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()
    return name


def pipeline_id(client, namespace: str | None) -> str | None:
    """The id of the pipeline named NAME in `namespace` (None: the shared pipelines), or None.

    kfp.Client.get_pipeline_id lists shared pipelines only: in a multi-user Kubeflow a
    namespace's own pipeline is found only by asking for that namespace.
    """
    name_filter = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS",
                                              "string_value": NAME}]})
    found = [p for p in client.list_pipelines(filter=name_filter, namespace=namespace, page_size=10).pipelines or []
             if p.display_name == NAME]
    if len(found) > 1:
        raise RuntimeError(f"{len(found)} pipelines are named {NAME} in namespace {namespace or '(shared)'}")
    return found[0].pipeline_id if found else None


def submit(package: Path, arguments: dict, commit: str, image: str, host: str, experiment: str,
           run_name: str | None = None, namespace: str | None = None, version_check: bool = True,
           image_check: bool = True) -> str:
    """Check the image and the server's version, find or upload the pipeline and the IR's version,
    start a run; returns its id. A bearer token comes from $KF_PIPELINES_TOKEN."""
    from kfp import Client

    token = os.environ.get("KF_PIPELINES_TOKEN") or None
    check_image(image)
    if image_check:
        found = image_in_registry(image)
        if not found:
            raise ParamError(f"image {image} is not in its registry{'' if found is False else ' (or it did not say)'}: "
                             f"push it first (make image-push REGISTRY={image.split('/')[0]}/...), or pass "
                             "--no-image-check if the cluster can pull it")
    if version_check:
        check_backend(package, host, backend_version(host, token))
    client = Client(host=host, existing_token=token)
    name = version_name(package, commit)
    found_id = pipeline_id(client, namespace)
    if found_id is None:
        found_id = client.upload_pipeline(str(package), NAME, namespace=namespace).pipeline_id
    versions = client.list_pipeline_versions(found_id, page_size=10, filter=json.dumps({"predicates": [{
        "key": "display_name", "operation": "EQUALS", "string_value": name}]}))
    same = [v for v in versions.pipeline_versions or [] if v.display_name == name]
    if same:  # this commit's IR, uploaded before (a dirty tree's names are unique: never here)
        version_id = same[0].pipeline_version_id
    else:
        version_id = client.upload_pipeline_version(str(package), name, pipeline_id=found_id).pipeline_version_id
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    result = client.run_pipeline(experiment_id=experiment_id, job_name=run_name or name, params=arguments,
                                 pipeline_id=found_id, version_id=version_id)
    return result.run_id
