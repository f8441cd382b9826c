"""The containerised pipeline: the image (make image), kfp's DockerRunner over podman's
Docker API, raw data from S3 on loopback, and the errors a user meets on the way.

The image tests need podman or docker. Where neither is installed they are skipped,
unless MOFE_REQUIRE_CONTAINERS=1 (CI sets it): then a missing engine is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from mofe_ood.params import merged
from tests.servers import DistributionRegistry

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SH = ROOT / "infra" / "image.sh"
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
RAW = "raw/fashion-mnist"


def sh(*cmd, env=None, timeout=120, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------ bad input, no image needed


def test_make_image_without_an_engine_says_what_to_install(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with git but neither docker nor podman
    bin_dir.mkdir()
    for tool in ("git", "timeout"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = sh("/bin/bash", IMAGE_SH, "engine", env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "no container engine: install podman" in done.stderr and "Docker" in done.stderr


def test_docker_run_names_the_socket_it_tried(tmp_path):
    socket = tmp_path / "nobody-listens.sock"
    done = sh(sys.executable, "pipeline.py", "run", "--runner", "docker", "--until", "prepare",
              "--root", tmp_path / "root", "--image", "mofe-ood:test",
              env={**os.environ, "DOCKER_HOST": f"unix://{socket}"})
    assert done.returncode == 1
    assert f"no container API answers at unix://{socket}" in done.stderr
    assert "infra/image.sh api start" in done.stderr


def test_image_tag_is_the_commit_and_says_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "infra").mkdir(parents=True)
    shutil.copy(IMAGE_SH, repo / "infra" / "image.sh")
    git = ["git", "-C", repo, "-c", "user.email=t@localhost", "-c", "user.name=t"]
    sh(*git, "init", "-q")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-q", "-m", "one")
    sha = sh(*git, "rev-parse", "--short=12", "HEAD").stdout.strip()
    assert sh("bash", repo / "infra" / "image.sh", "tag").stdout.strip() == sha
    (repo / "infra" / "image.sh").write_text((repo / "infra" / "image.sh").read_text() + "\n")
    assert sh("bash", repo / "infra" / "image.sh", "tag").stdout.strip() == f"{sha}-dirty"


# ------------------------------------------------------------------ the image and podman's API


def engine() -> str | None:
    done = sh("bash", IMAGE_SH, "engine", timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.fixture(scope="session")
def image() -> str:
    """`make image` (the same script): cached layers make a rebuild after a code change quick."""
    if engine() is None:
        if os.environ.get("MOFE_REQUIRE_CONTAINERS") == "1":
            pytest.fail("MOFE_REQUIRE_CONTAINERS=1 but no container engine works: " +
                        sh("bash", IMAGE_SH, "engine").stderr)
        pytest.skip("no container engine (podman or docker): the image cannot be built here")
    done = sh("bash", IMAGE_SH, "build", timeout=3000)
    assert done.returncode == 0, done.stderr[-4000:]
    name, size = done.stdout.strip().splitlines()[-1].split("\t")
    assert name.startswith("mofe-ood:") and size.endswith("GB")
    return name


@pytest.fixture(scope="session")
def docker_host(image, tmp_path_factory) -> str:
    """podman's Docker API on a socket of this session (started and stopped by PID)."""
    if engine() == "docker":
        return os.environ.get("DOCKER_HOST", "")
    state = tmp_path_factory.mktemp("podman-api")
    env = {**os.environ, "SERVICES_DIR": str(state)}
    done = sh("bash", IMAGE_SH, "api", "start", env=env)
    assert done.returncode == 0, done.stderr
    host = sh("bash", IMAGE_SH, "api", "env", env=env).stdout.split("=", 1)[1].strip()
    yield host
    sh("bash", IMAGE_SH, "api", "stop", env=env)
    assert not (state / "podman-api.pid").exists()


@pytest.fixture(scope="session")
def raw_s3(seaweedfs, tmp_path_factory):
    """Fashion-MNIST's files in the test bucket, put there by `mofe push-raw`."""
    home = tmp_path_factory.mktemp("push-home")
    done = sh(Path(sys.executable).parent / "mofe", "push-raw", "--src", FASHION_MNIST,
              env={**seaweedfs.env, "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"uri": f"s3://{seaweedfs.bucket}/{RAW}", "objects": 4,
                                       "from": str(FASHION_MNIST)}
    return seaweedfs


def docker_run(tmp_path: Path, server, docker_host: str, image: str, *args: str,
               params: dict, timeout: int = 1200, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return sh(sys.executable, "pipeline.py", "run", "--runner", "docker", "--image", image,
              "--params", tmp_path / "params.yaml", "--root", tmp_path / "root", *args,
              env={**server.env, "DOCKER_HOST": docker_host, "PATH": os.environ["PATH"], **env},
              timeout=timeout)


@pytest.mark.slow
def test_prepare_runs_in_the_image_on_data_from_s3(raw_s3, docker_host, image, tmp_path, tiny_params):
    """No host folder but the pipeline root: Fashion-MNIST from S3, the rest from the image."""
    done = docker_run(tmp_path, raw_s3, docker_host, image, "--until", "prepare", params=tiny_params)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (prepared,) = (tmp_path / "root").glob("mofe-ood-*/prepare/prepared")
    manifest = json.loads((prepared / "manifest.json").read_text())
    # The same arrays as prepare on the host, from the host's folder.
    from mofe_ood import prepare

    host = prepare.run(tiny_params, tmp_path / "host")
    assert {k: v["sha256"] for k, v in manifest["splits"].items()} == \
           {k: v["sha256"] for k, v in host["splits"].items()}


@pytest.mark.slow
def test_a_step_that_fails_in_its_container_fails_the_run_at_that_step(raw_s3, docker_host, image, tmp_path,
                                                                       tiny_params):
    params = merged(tiny_params, {"prepare": {"fashion_mnist_dir": "s3://nowhere-bucket/raw"}})
    done = docker_run(tmp_path, raw_s3, docker_host, image, params=params)
    assert done.returncode == 1
    assert "finished with status FAILURE. Inner task failed: 'prepare'" in done.stderr
    assert "bucket 'nowhere-bucket' does not exist" in done.stdout  # the step's own error, streamed
    assert not list((tmp_path / "root").glob("mofe-ood-*/extract"))  # nothing ran after it


def image_user(image: str) -> int:
    """The uid the image's USER names (the Dockerfile's 10001)."""
    done = sh(engine(), "image", "inspect", image, "--format", "{{.Config.User}}")
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(":")[0])


@pytest.mark.slow
def test_train_with_finetune_checkpoints_runs_in_the_image_as_its_own_user(
        raw_s3, docker_host, image, tmp_path, tiny_params, finetune_params):
    """Every step as the image's user (10001, as in a pod), never the host's: the runner's folders
    are writable for it, and the fine-tune checkpoints go to the data PVC's stand-in (an absolute
    path under kfp.data_mount), which outlives the run as a PVC outlives a retried pod."""
    tiny_finetune = finetune_params("/data/checkpoints/finetune", enabled=True)
    params = merged(tiny_params, {"extract": tiny_finetune["extract"], "finetune": tiny_finetune["finetune"],
                                  "kfp": {"data_pvc": "ckpt", "data_mount": "/data"}})
    done = docker_run(tmp_path, raw_s3, docker_host, image, "--until", "train", params=params)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uid = image_user(image)
    assert uid == 10001
    (run,) = (tmp_path / "root").glob("mofe-ood-*")
    assert {p.stat().st_uid for p in run.rglob("*")} == {uid}  # every step's outputs: the image's user's
    assert (run / "train" / "models" / tiny_finetune["finetune"]["variant"] / "model.safetensors").is_file()
    # The checkpoints went to the volume (removed once training finished, their folder stays).
    checkpoints = tmp_path / "root" / "volumes" / "ckpt" / "checkpoints" / "finetune"
    assert checkpoints.is_dir() and checkpoints.stat().st_uid == uid


@pytest.fixture
def registry(tmp_path):
    """A real registry on loopback: the distribution registry v2 (Debian's docker-registry)."""
    if shutil.which(DistributionRegistry.BINARY) is None:
        if os.environ.get("MOFE_REQUIRE_CONTAINERS") == "1":
            pytest.fail("MOFE_REQUIRE_CONTAINERS=1 but docker-registry is missing (apt-get install docker-registry)")
        pytest.skip("no docker-registry (Debian package): no registry to push to")
    (tmp_path / "registry").mkdir()
    with DistributionRegistry(tmp_path / "registry") as running:
        yield running


@pytest.mark.slow
def test_make_image_push_then_submit_checks_the_tag_in_the_registry(image, registry, tmp_path, request):
    """As a user: `make image-push REGISTRY=127.0.0.1:PORT/mofe` pushes the commit's image (plain
    HTTP on loopback), then `pipeline.py submit` (a fake KFP) passes the image check for that tag
    and refuses, before any upload, a tag the registry does not have."""
    from tests.fake_kfp import FakeKFP

    # A clean checkout of this commit (push refuses a dirty tree's tag, as submit does); its
    # `make image` reuses the cached layers of the session's image.
    clone = tmp_path / "clone"
    assert sh("git", "clone", "-q", ROOT, clone).returncode == 0
    built = sh("make", "-s", "image", cwd=clone, timeout=3000)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = sh("bash", "infra/image.sh", "tag", cwd=clone).stdout.strip()
    assert tag and not tag.endswith("-dirty")
    pushed = sh("make", "-s", "image-push", f"REGISTRY={registry.host}/mofe", cwd=clone, timeout=3000)
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-3000:]
    repository = f"{registry.host}/mofe/mofe-ood"
    # The push tagged the local image with the registry's name: that tag goes (the image stays).
    request.addfinalizer(lambda: sh(engine(), "rmi", f"{repository}:{tag}"))
    assert pushed.stdout.strip().splitlines()[-1] == f"{repository}:{tag}"
    assert f"set kfp.image: {repository}" in pushed.stderr

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "REGISTRY_AUTH_FILE": str(tmp_path / "no-auth.json")}  # the registry asks for no login
    with FakeKFP() as kfp:
        def submit(image):
            return sh(sys.executable, "pipeline.py", "submit", "--host", kfp.url, "--image", image,
                      cwd=clone, env=env, timeout=300)

        done = submit(repository)  # no tag: the checkout's, the one pushed
        assert done.returncode == 0, done.stderr[-3000:]
        (run,) = kfp.state.runs
        spec = next(yaml.safe_load_all(kfp.version_yaml(run["pipeline_version_reference"]["pipeline_version_id"])))
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == \
               {f"{repository}:{tag}"}
        posts = list(kfp.state.posts)
        unpushed = f"{repository}:{'0' * 12}"
        done = submit(unpushed)
        assert done.returncode == 2
        assert f"image {unpushed} is not in its registry: push it first" in done.stderr
        assert kfp.state.posts == posts  # refused before anything was uploaded


@pytest.fixture(scope="session")
def mlflow_server(raw_s3, free_ports):
    """An MLflow server beside the test S3 server (infra/services.sh, free port)."""
    env = {**raw_s3.env, "MLFLOW_PORT": str(free_ports(1)[0])}
    done = subprocess.run(["bash", str(ROOT / "infra" / "services.sh"), "start", "--mlflow"], env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    yield f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    # the session's seaweedfs fixture stops both (services.sh stop stops MLflow too)


@pytest.mark.slow
def test_the_whole_pipeline_in_containers_matches_the_host_and_records_its_lineage(
        raw_s3, docker_host, image, mlflow_server, tmp_path, tiny_params, tiny_project):
    done = docker_run(tmp_path, raw_s3, docker_host, image, params=tiny_params, MLFLOW_TRACKING_URI=mlflow_server)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (tmp_path / "root").glob("mofe-ood-*")
    got = json.loads((run / "evaluate" / "reports" / "metrics.json").read_text())
    expected = json.loads((tiny_project / "reports" / "metrics.json").read_text())

    def numbers(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from numbers(value, f"{prefix}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{key}", value

    got, expected = dict(numbers(got)), dict(numbers(expected))
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-6)

    registration = json.loads((run / "register" / "registration").read_text())
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    tags = client.get_run(registration["run_id"]).data.tags
    assert tags["image"].endswith(image)  # podman names it localhost/<image>
    assert tags["kfp_run_id"].startswith("local-")  # kfpipe.local.run's, given to the containers as env
    assert tags["features_uri"].endswith("/extract/features")
    commit = subprocess.run(["podman", "image", "inspect", image, "--format",
                             "{{index .Labels \"org.opencontainers.image.revision\"}}"],
                            capture_output=True, text=True).stdout.strip()
    assert commit and tags["git_commit"] == commit.removesuffix("-dirty")
