"""Object storage against a real SeaweedFS: clear errors, DVC push/pull (also across a crash), MLflow artifacts."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mofe_ood.storage import StorageError, check_s3, s3_settings
from tests.conftest import BIN, ROOT, SERVICES, clean_env, free_port_pairs


def sh(*cmd, cwd, env, timeout=120):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args, cwd, env, timeout=120):
    return sh(str(BIN / "dvc"), *args, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    for name, value in seaweedfs.env.items():
        if name.startswith(("AWS_", "S3_", "MLFLOW_S3")):
            monkeypatch.setenv(name, value)
    return seaweedfs


# --- settings and check_s3 -------------------------------------------------------------

def test_settings_come_from_the_environment_with_local_defaults():
    assert s3_settings(env={}).endpoint_url == "http://127.0.0.1:8333"
    assert s3_settings(env={}).bucket == "mofe-ood"
    env = {"MLFLOW_S3_ENDPOINT_URL": "http://mlflow-s3:9000", "S3_BUCKET": "b"}
    assert s3_settings(env=env).endpoint_url == "http://mlflow-s3:9000"
    env["S3_ENDPOINT_URL"] = "http://s3:9000"
    settings = s3_settings(env=env)
    assert (settings.endpoint_url, settings.bucket) == ("http://s3:9000", "b")
    assert "secret" not in repr(s3_settings(env={"AWS_SECRET_ACCESS_KEY": "secret"}))


def test_storage_module_imports_without_boto3():
    code = "import sys, mofe_ood.storage; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.slow
def test_check_s3_accepts_the_running_server(s3_env):
    assert check_s3().endpoint_url == s3_env.endpoint


@pytest.mark.slow
def test_check_s3_fails_fast_naming_endpoint_and_bucket_when_the_server_is_down(s3_env):
    endpoint = f"http://127.0.0.1:{free_port_pairs(1)[0]}"
    start = time.monotonic()
    with pytest.raises(StorageError, match="not reachable") as err:
        check_s3(endpoint=endpoint)
    assert time.monotonic() - start < 5
    assert endpoint in str(err.value) and s3_env.bucket in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_check_s3_names_endpoint_and_bucket_for_wrong_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="rejected the credentials") as err:
        check_s3()
    assert s3_env.endpoint in str(err.value) and s3_env.bucket in str(err.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match="rejected the credentials"):
        check_s3()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StorageError, match="no S3 credentials") as err:
        check_s3()
    assert s3_env.endpoint in str(err.value)


@pytest.mark.slow
def test_check_s3_names_endpoint_and_bucket_for_an_unknown_bucket(s3_env):
    with pytest.raises(StorageError, match="does not exist") as err:
        check_s3(bucket="no-such-bucket")
    assert s3_env.endpoint in str(err.value) and "no-such-bucket" in str(err.value)


def test_storage_error_is_a_value_error():
    # The CLI prints ValueErrors as one line without a stack trace.
    assert issubclass(StorageError, ValueError)


# --- infra/services.sh -----------------------------------------------------------------

@pytest.mark.slow
def test_services_start_is_idempotent_and_env_exports_the_settings(seaweedfs):
    pid = seaweedfs.pid
    again = seaweedfs.services("start")
    assert "already running" in again.stderr and seaweedfs.pid == pid
    assert "running" in seaweedfs.services("status").stdout
    exported = seaweedfs.services("env").stdout
    shell = f"{exported}\necho $S3_ENDPOINT_URL $MLFLOW_S3_ENDPOINT_URL $S3_BUCKET $AWS_ACCESS_KEY_ID"
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.split()
    assert out == [seaweedfs.endpoint, seaweedfs.endpoint, seaweedfs.bucket, seaweedfs.access_key]


@pytest.mark.slow
def test_services_refuses_a_port_taken_by_another_server(seaweedfs, tmp_path):
    env = dict(seaweedfs.env, SERVICES_DIR=str(tmp_path / "other"))
    result = subprocess.run(["bash", str(SERVICES), "start"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"port {seaweedfs.ports['S3_PORT']}" in result.stderr and "in use" in result.stderr
    stopped = subprocess.run(["bash", str(SERVICES), "status"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 3


def test_services_generates_local_credentials_once_private(tmp_path):
    env = clean_env(tmp_path, SERVICES_DIR=str(tmp_path / "svc"), S3_ENV_FILE=str(tmp_path / "s3.env"))
    first = subprocess.run(["bash", str(SERVICES), "env"], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run(["bash", str(SERVICES), "env"], env=env, capture_output=True, text=True, check=True)
    assert "generated" in first.stderr and "generated" not in second.stderr
    assert first.stdout == second.stdout and "export AWS_SECRET_ACCESS_KEY=" in first.stdout
    assert stat.S_IMODE((tmp_path / "s3.env").stat().st_mode) == 0o600


# --- DVC ---------------------------------------------------------------------------------

def point_at(repo: Path, server, prefix: str) -> None:
    """The documented override: the committed remote `storage`, redirected in .dvc/config.local."""
    dvc("remote", "modify", "--local", "storage", "url", f"s3://{server.bucket}/{prefix}", cwd=repo, env=server.env)
    dvc("remote", "modify", "--local", "storage", "endpointurl", server.endpoint, cwd=repo, env=server.env)


def dvc_repo(path: Path, server, prefix: str) -> Path:
    path.mkdir()
    sh("git", "init", "-q", cwd=path, env=server.env)
    dvc("init", "-q", cwd=path, env=server.env)
    # The project's own remote definition (credentials are never in it).
    (path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    point_at(path, server, prefix)
    return path


def write_files(root: Path, count: int, size: int) -> None:
    for i in range(count):
        f = root / f"part{i % 3}" / f"file{i:04d}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(size))


def files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def cached_objects(repo: Path) -> set[str]:
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    return {f"{p.parent.name}/{p.name}" for p in cache.glob("*/*")}


def test_project_remote_is_s3_on_the_local_endpoint_without_credentials():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = storage" in config
    assert "url = s3://mofe-ood/dvc" in config and "endpointurl = http://127.0.0.1:8333" in config
    assert "access_key" not in config and "secret" not in config


@pytest.mark.slow
def test_dvc_push_then_pull_in_a_fresh_clone_is_byte_identical(seaweedfs, tmp_path):
    repo = dvc_repo(tmp_path / "repo", seaweedfs, "dvc-roundtrip")
    write_files(repo / "data", 12, 20_000)
    (repo / "data" / "big.bin").write_bytes(os.urandom(6 * 2**20))  # above the multipart threshold
    dvc("add", "data", cwd=repo, env=seaweedfs.env)
    sh("git", "add", "-A", cwd=repo, env=seaweedfs.env)
    sh("git", "commit", "-qm", "data", cwd=repo, env=seaweedfs.env)
    dvc("push", cwd=repo, env=seaweedfs.env)
    remote = {k.split("/md5/", 1)[1] for k in seaweedfs.keys("dvc-roundtrip/")}
    assert cached_objects(repo) <= remote

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=seaweedfs.env)
    point_at(clone, seaweedfs, "dvc-roundtrip")  # .dvc/config.local is not cloned
    dvc("pull", cwd=clone, env=seaweedfs.env)
    originals, pulled = files_under(repo / "data"), files_under(clone / "data")
    assert originals == pulled and len(originals) == 13
    for rel in originals:
        assert (repo / "data" / rel).read_bytes() == (clone / "data" / rel).read_bytes(), rel


@pytest.mark.slow
def test_a_push_cut_by_a_server_crash_completes_after_restart(seaweedfs, tmp_path):
    """SIGKILL the server mid-push. DVC then retries every remaining file for minutes,
    so the user interrupts it (Ctrl-C); the server restarts; pushing again leaves
    nothing missing on the remote."""
    repo = dvc_repo(tmp_path / "repo", seaweedfs, "dvc-crash")
    write_files(repo / "data", 300, 4_000)
    dvc("add", "data", cwd=repo, env=seaweedfs.env)
    expected = cached_objects(repo)
    assert len(expected) == 301  # the files + the directory listing

    push = subprocess.Popen([str(BIN / "dvc"), "push", "-j", "2"], cwd=repo, env=seaweedfs.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(seaweedfs.keys("dvc-crash/")) < 20 and push.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert push.poll() is None, "the push finished before the server could be killed"
        seaweedfs.kill()
        time.sleep(1)  # uploads now fail against the dead server
        push.send_signal(signal.SIGINT)
        try:
            output, _ = push.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # DVC sometimes ignores Ctrl-C while it retries against the dead server (seen in the
            # full suite, not alone): the user kills it then. Either way the push is cut short,
            # which is what the rest of the test needs.
            push.kill()
            output, _ = push.communicate(timeout=30)
    finally:
        if push.poll() is None:
            push.kill()
        seaweedfs.start()  # a no-op if the server still runs; the other tests share it
    assert push.returncode != 0, output
    assert len(seaweedfs.keys("dvc-crash/")) < len(expected)  # the next push has work left

    dvc("push", cwd=repo, env=seaweedfs.env)
    status = dvc("status", "-c", cwd=repo, env=seaweedfs.env)
    assert "in sync" in status, status
    remote = {k.split("/md5/", 1)[1] for k in seaweedfs.keys("dvc-crash/")}
    assert expected <= remote, f"missing on the remote: {sorted(expected - remote)[:5]}"


# --- MLflow ------------------------------------------------------------------------------

MLFLOW_LOG = """
import sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.create_experiment("storage-check", artifact_location=sys.argv[2])
run = client.create_run(experiment)
client.log_artifact(run.info.run_id, sys.argv[3])
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


@pytest.mark.slow
def test_mlflow_artifacts_land_in_the_bucket(seaweedfs, tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"auroc": 0.97}')
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = f"s3://{seaweedfs.bucket}/mlflow-test"
    result = subprocess.run([sys.executable, "-c", MLFLOW_LOG, tracking, location, str(report)],
                            cwd=tmp_path, env=seaweedfs.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[-1]
    key = f"mlflow-test/{run_id}/artifacts/report.json"
    assert key in seaweedfs.keys("mlflow-test/")
    body = seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key)["Body"].read()
    assert body == report.read_bytes()


# --- s3:// raw data for `prepare` (what a container step reads instead of a host folder) -----


@pytest.mark.slow
def test_download_names_bucket_and_key_when_nothing_is_there(s3_env, tmp_path):
    from mofe_ood.storage import StorageError, download

    with pytest.raises(StorageError,
                       match=r"no object s3://mofe-ood-test/raw/none \(bucket 'mofe-ood-test', key 'raw/none'\)"):
        download(f"s3://{s3_env.bucket}/raw/none", tmp_path / "a", "prepare.fashion_mnist_dir")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist .*key 'x'"):
        download("s3://no-such-bucket/x", tmp_path / "b")
    with pytest.raises(StorageError, match="not an s3:// URI"):
        download("/local/path", tmp_path / "c")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_upload_then_download_a_folder_keeps_its_layout(s3_env, tmp_path):
    from mofe_ood.storage import download, upload

    write_files(tmp_path / "src", 5, 100)
    keys = upload(tmp_path / "src", f"s3://{s3_env.bucket}/t/folder")
    assert len(keys) == 5
    download(f"s3://{s3_env.bucket}/t/folder", tmp_path / "dst")
    assert files_under(tmp_path / "dst") == files_under(tmp_path / "src")
    one = keys[0].split("/", 3)[3]
    download(f"s3://{s3_env.bucket}/{one}", tmp_path / "single")  # one object, not a prefix
    assert len(files_under(tmp_path / "single")) == 1


@pytest.mark.slow
def test_prepare_reads_fashion_mnist_and_image_folders_from_s3(s3_env, tmp_path):
    """The same splits as from the host's folders; image folders travel inside the output."""
    from PIL import Image

    from mofe_ood import prepare
    from mofe_ood.backbones import Preprocess, image_batch
    from mofe_ood.params import load, merged
    from mofe_ood.splits import load_split
    from mofe_ood.storage import upload

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split, n in (("train", 6), ("test", 2)):
            folder = tmp_path / "ds" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    fashion = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    bucket = s3_env.bucket
    upload(fashion, f"s3://{bucket}/raw/fashion-mnist")
    upload(tmp_path / "ds", f"s3://{bucket}/raw/ds")
    small = {"id": {"train_per_class": 10, "val_per_class": 5, "test_per_class": 5},
             "ood": {"fmnist_near": {"count": 20}, "textures": {"count": 3, "crop_size": 32}},
             "ood_split": {"val_fraction": 0, "seed": 0}}  # every folder image in one split
    local = merged(load(ROOT / "params.yaml"), {
        "base": {"seed": 3}, "prepare": {**small, "fashion_mnist_dir": fashion},
        "evaluate": {"extra_ood": {"folder": {"path": str(tmp_path / "ds" / "test"), "group": "far"}}}})
    remote = merged(local, {"prepare": {"fashion_mnist_dir": f"s3://{bucket}/raw/fashion-mnist"},
                            "evaluate": {"extra_ood": {"folder": {"path": f"s3://{bucket}/raw/ds/test"}}}})
    host = prepare.run(local, tmp_path / "host")
    got = prepare.run(remote, tmp_path / "s3")
    for name in ("train", "val", "test", "fmnist_near", "textures"):
        assert got["splits"][name]["sha256"] == host["splits"][name]["sha256"], name
    # The folder's files are copied into the output and named relative to it ...
    with np.load(tmp_path / "s3" / "folder.npz") as f:
        assert [p.split("/", 2)[:2] for p in f["paths"]] == [["files", "ood.folder"]] * 4
    # ... so the output can move (another container, another mount point) and still be read.
    (tmp_path / "s3").rename(tmp_path / "moved")
    images = load_split(tmp_path / "moved", "folder")
    assert all(Path(p).is_file() for p in images.paths)
    batch = image_batch(images, 0, 4, Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    assert tuple(batch.shape) == (4, 3, 32, 32)
    # An ImageFolder ID source from S3 too.
    id_remote = merged(remote, {"prepare": {"id": {"source": "imagefolder", "root": f"s3://{bucket}/raw/ds",
                                                   "classes": None, "train_per_class": None,
                                                   "val_per_class": 2, "test_per_class": None},
                                            "ood": {}}, "evaluate": {"extra_ood": {}}})
    manifest = prepare.run(id_remote, tmp_path / "id")
    assert manifest["classes"] == ["a", "b"] and manifest["splits"]["train"]["count"] == 8
    assert manifest["splits"]["test"]["count"] == 4
