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
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert container(("Deployment", "mlflow"))["image"] in {i["name"] for i in kustomization["images"]}
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
