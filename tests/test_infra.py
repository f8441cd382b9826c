"""Cluster deployment files: valid Kubernetes objects, consistent with each other, no credentials."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
KFP = ROOT / "infra" / "kfp"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37 bundles
PLACEHOLDER = re.compile(r"^(REPLACE_ME|CHANGE_ME|<[^>]*>)$")


def manifests() -> list[Path]:
    return sorted(p for p in [*K8S.glob("*.yaml"), *KFP.glob("*.yaml")] if p.name != "kustomization.yaml")


def objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_objects() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for p in manifests() for o in objects(p)}


def container(kind_name: tuple[str, str]) -> dict:
    (c,) = all_objects()[kind_name]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_is_a_valid_kubernetes_object(path):
    docs = objects(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        # strict: unknown fields (typos) fail too, as `kubectl apply` would reject them.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_unknown_fields():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80, "targetPort": 80, "protcol": "TCP"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)
    assert kustomization["namespace"] == "mofe-ood"
    assert ("Namespace", "mofe-ood") in all_objects()


def test_secret_template_holds_placeholders_only():
    secrets = [o for p in manifests() for o in objects(p) if o["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "base64 `data` hides what is committed: use stringData placeholders"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER.match(str(value)), f"Secret {secret['metadata']['name']}: {key} looks real"


def test_no_credentials_anywhere_under_infra():
    aws_key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(r"(SECRET_ACCESS_KEY|PASSWORD)\s*[:=]\s*['\"]?([A-Za-z0-9/+=]{16,})")
    for path in [*ROOT.joinpath("infra").rglob("*"), ROOT / ".dvc" / "config"]:
        if path.is_file():
            text = path.read_text()
            assert not aws_key_id.search(text), path
            assert not assignment.search(text), path


def test_every_reference_between_manifests_resolves():
    objs = all_objects()
    secret_keys = set(objs[("Secret", "mofe-ood-s3")]["stringData"])
    config = objs[("ConfigMap", "mofe-ood-storage")]["data"]
    for name in ("seaweedfs", "mlflow"):
        deployment = objs[("Deployment", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert objs[("Service", name)]["spec"]["selector"].items() <= labels.items()
        spec = deployment["spec"]["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
        assert all(("PersistentVolumeClaim", c) in objs for c in claims)
        for source in spec["containers"][0].get("envFrom", []):
            assert ("Secret", source["secretRef"]["name"]) in objs
    # The endpoints the steps are given are the Services that exist.
    assert config["S3_ENDPOINT_URL"] == "http://seaweedfs.mofe-ood.svc.cluster.local:8333"
    assert config["MLFLOW_TRACKING_URI"] == "http://mlflow.mofe-ood.svc.cluster.local:5000"
    assert objs[("Service", "seaweedfs")]["spec"]["ports"][0]["port"] == 8333
    assert objs[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000
    # One bucket everywhere: created by SeaweedFS, used by MLflow and as the KFP pipeline root.
    bucket = config["S3_BUCKET"]
    assert f"-bucket={bucket}" in container(("Deployment", "seaweedfs"))["args"]
    mlflow_args = container(("Deployment", "mlflow"))["args"]
    assert f"--artifacts-destination=s3://{bucket}/mlflow" in mlflow_args
    assert "--host=0.0.0.0" in mlflow_args and any(a.startswith("--allowed-hosts=") for a in mlflow_args)
    launcher = objs[("ConfigMap", "kfp-launcher")]["data"]
    assert launcher["defaultPipelineRoot"].startswith(f"s3://{bucket}/")
    ref = yaml.safe_load(launcher["providers"])["s3"]["default"]["credentials"]["secretRef"]
    assert ref["secretName"] == "mofe-ood-s3"
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= secret_keys


def test_mlflow_runs_from_the_component_image_as_non_root():
    from components import DEFAULT_IMAGE

    # A placeholder the overlay renames (test_the_readme_overlay_builds_and_names_the_image).
    assert container(("Deployment", "mlflow"))["image"] == DEFAULT_IMAGE
    security = all_objects()[("Deployment", "mlflow")]["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_installs_pinned_dependencies_apart_from_the_code_as_non_root():
    steps = dockerfile_instructions()
    # The base is a build argument, the CUDA base by default (make image swaps in a local one).
    assert steps[0][0] == "ARG" and re.match(r"BASE_IMAGE=nvidia/cuda:", steps[0][1])
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    ops = [op for op, _ in steps]
    runs = [(i, arg) for i, (op, arg) in enumerate(steps) if op == "RUN"]
    (deps,) = [i for i, arg in runs if re.search(r"pip install -c requirements\.lock \"\.\[pipeline\]\"", arg)]
    (code,) = [i for i, arg in runs if "--no-deps" in arg and "--no-index" in arg]
    copies = {arg: i for i, (op, arg) in enumerate(steps) if op == "COPY"}
    # Dependencies come from pyproject + the lock only; the code and README (pyproject's readme)
    # are copied after them, so a code or README change reuses the dependency layer.
    assert copies["pyproject.toml requirements.lock ./"] < deps < copies["mofe_ood ./mofe_ood"] < code
    assert deps < copies["README.md params.yaml dvc.yaml ./"] < code
    assert not any("README" in arg for arg, i in copies.items() if i < deps)
    # The commit: a build argument, a label and the env var the register step reads.
    assert "ARG" in ops and any(arg.startswith("GIT_COMMIT=") for op, arg in steps if op == "ARG")
    assert any("org.opencontainers.image.revision=$GIT_COMMIT" in arg for op, arg in steps if op == "LABEL")
    assert any("MOFE_GIT_COMMIT=$GIT_COMMIT" in arg for op, arg in steps if op == "ENV")
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "HF_HUB_OFFLINE" not in env, "the image must not force offline hub access"


def test_makefile_and_image_pin_the_same_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c requirements.lock" in makefile
    pins = [line for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all("==" in line for line in pins) and any(line.startswith("torch==") for line in pins)


def test_image_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "infra" / "image.sh")], check=True)


def test_dockerignore_keeps_credentials_and_data_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".s3.env", ".dvc/config.local", ".services", ".venv", ".git", "data"} <= ignored


def test_services_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "infra" / "services.sh")], check=True)


# ------------------------------------------------------------------ built manifests (kubectl kustomize)

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# Pod Security Standards, `restricted` (kubernetes.io/docs/concepts/security/pod-security-standards).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret", "name"}


def kustomize(folder: Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in WORKLOADS}
    pods.update({d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Pod"})
    return pods


def restricted_violations(name: str, pod: dict) -> list[str]:
    """What the Pod Security `restricted` profile refuses in `pod` (empty: admitted)."""
    out = []
    security = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{name}: {flag}")
    out += [f"{name}: volume {v['name']} is not an allowed type" for v in pod.get("volumes", [])
            if set(v) - RESTRICTED_VOLUMES]
    for c in pod.get("initContainers", []) + pod["containers"]:
        own = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if own.get("privileged"):
            out.append(f"{where}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        capabilities = own.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"{where}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: adds capabilities {capabilities['add']}")
        if not own.get("runAsNonRoot", security.get("runAsNonRoot")):
            out.append(f"{where}: runAsNonRoot must be true")
        if own.get("runAsUser", security.get("runAsUser")) == 0:
            out.append(f"{where}: runs as uid 0")
        seccomp = own.get("seccompProfile", security.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, not {seccomp}")
    return out


def readme_overlay(tmp_path: Path, components: bool = False) -> Path:
    """infra/README.md's overlay, as a user writes it next to a checkout named mofe-ood."""
    readme = (ROOT / "infra" / "README.md").read_text()
    text = re.search(r"cat > kustomization\.yaml <<'EOF'\n(.*?)\nEOF\n", readme, re.S)[1]
    text = text.replace("REGISTRY", "registry.example.org/team").replace("COMMIT_TAG", "0123456789ab")
    if components:  # the README's basic-auth lines, uncommented
        text = re.sub(r"^# (.*?)\s+# MLflow basic auth.*$", r"\1", text, flags=re.M)
    (tmp_path / "mofe-ood" / "infra").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(K8S), str(tmp_path / "mofe-ood" / "infra" / "k8s")], check=True)
    deploy = tmp_path / "mofe-deploy"
    deploy.mkdir()
    (deploy / "kustomization.yaml").write_text(text)
    (deploy / "s3.env").write_text("AWS_ACCESS_KEY_ID=id-from-env-file\nAWS_SECRET_ACCESS_KEY=key-from-env-file\n")
    (deploy / "mlflow-auth.env").write_text("MLFLOW_TRACKING_USERNAME=admin\n"
                                            "MLFLOW_TRACKING_PASSWORD=pw-from-env-file\n")
    return deploy


def test_every_pod_meets_the_restricted_pod_security_profile(tmp_path):
    for docs in (kustomize(K8S), kustomize(readme_overlay(tmp_path, components=True))):
        pods = pod_specs(docs)
        assert {"mlflow", "seaweedfs"} <= set(pods)
        assert [v for name, pod in pods.items() for v in restricted_violations(name, pod)] == []
        (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The check itself refuses what the profile refuses.
    bad = {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
           "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert len(restricted_violations("bad", bad)) == 6


def test_mlflow_is_reachable_only_from_pipeline_pods():
    docs = kustomize(K8S)
    mlflow = pod_specs(docs)["mlflow"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    assert policies and mlflow
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every pod"
            for peer in rule["from"]:
                # Only pods of a Kubeflow Pipelines run (every backend labels them pipeline/runid).
                assert "ipBlock" not in peer
                assert {"key": "pipeline/runid", "operator": "Exists"} in peer["podSelector"]["matchExpressions"]
            assert [p["port"] for p in rule["ports"]] == [5000]


def test_the_readme_overlay_builds_and_names_the_image(tmp_path):
    docs = kustomize(readme_overlay(tmp_path))
    images = {c["image"] for pod in pod_specs(docs).values() for c in pod["containers"]}
    assert images == {"registry.example.org/team/mofe-ood:0123456789ab", "chrislusf/seaweedfs:4.48"}
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "mofe-ood-s3"]
    assert "REPLACE_ME" not in str(secret)  # replaced by the overlay's s3.env


def test_mlflow_basic_auth_takes_its_admin_from_a_secret(tmp_path):
    docs = kustomize(readme_overlay(tmp_path, components=True))
    (mlflow,) = pod_specs(docs)["mlflow"]["containers"]
    assert "--app-name=basic-auth" in mlflow["args"]
    env = {e["name"]: e for e in mlflow["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mofe-ood-mlflow-auth"
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "mofe-ood-mlflow-auth"]
    assert "REPLACE_ME" not in str(secret)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth-config"]
    ini = config["data"]["basic_auth.ini"]
    assert "database_uri = sqlite:////mlflow/basic_auth.db" in ini  # on the volume: users survive restarts
    mount = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert any(mount.startswith(m["mountPath"]) for m in mlflow["volumeMounts"])


def test_index_urls_reach_the_build_as_secrets_never_as_args():
    """An index URL can carry a token; a build arg stays in the image history."""
    args = [arg for op, arg in dockerfile_instructions() if op == "ARG"]
    assert not [a for a in args if re.search(r"INDEX|LINKS|URL|TOKEN|PASSWORD", a)], args
    runs = " ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    for secret in ("pipindex", "piplinks", "pipca"):
        assert f"--mount=type=secret,id={secret}" in runs
    script = (ROOT / "infra" / "image.sh").read_text()
    assert not re.search(r"--build-arg \"?PIP_", script)
    assert "id=pipindex,src=" in script and "id=piplinks,src=" in script


def test_image_push_names_a_registry_and_refuses_a_dirty_tree(tmp_path):
    """make image-push: a -dirty tag names no commit's code, so it never reaches a registry."""
    repo = tmp_path / "repo"
    (repo / "infra").mkdir(parents=True)
    subprocess.run(["cp", str(ROOT / "infra" / "image.sh"), str(repo / "infra")], check=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@localhost", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    push = ["bash", str(repo / "infra" / "image.sh"), "push"]
    done = subprocess.run(push, capture_output=True, text=True)
    assert done.returncode == 1 and "name the registry" in done.stderr
    (repo / "infra" / "image.sh").write_text((repo / "infra" / "image.sh").read_text() + "\n")
    done = subprocess.run([*push, "localhost:5000/team"], capture_output=True, text=True)
    assert done.returncode == 1 and "the tree is dirty" in done.stderr and "-dirty" in done.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image-push:\n\tinfra/image\.sh push \$\(REGISTRY\)$", makefile, re.M)
