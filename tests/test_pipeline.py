"""The Kubeflow pipeline (pipeline.py, components/): its IR, a whole local run, and submit."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec.pipeline_spec_pb2 import PipelineSpec, PlatformSpec

from mofe_ood import extract, stages
from mofe_ood.params import load, merged

ROOT = Path(__file__).resolve().parents[1]
STAGES = stages.names()
# The tiny run (conftest.py), extraction in 2 shards of whole batches of 64 images.
SHARDED = {"extract": {"shards": 2}}
FAKE_SECRET = "not-a-real-secret-5f3a9c"
IMAGE = "registry.example.org/mofe-ood:test"


def pipeline_py(*args, env=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "MOFE_IMAGE": IMAGE, **(env or {})}
    done = subprocess.run([sys.executable, "pipeline.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ------------------------------------------------------------------ the compiled IR


def compiled(tmp_path_factory, *sets: str, env=None) -> tuple[str, dict, dict, float]:
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    start = time.perf_counter()
    pipeline_py("compile", "--out", out, *[a for s in sets for a in ("--set", s)], env=env)
    seconds = time.perf_counter() - start
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform, seconds


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    """The IR of the default params."""
    return compiled(tmp_path_factory)


@pytest.fixture(scope="module")
def ir_gpu(tmp_path_factory):
    """Fine-tuning on 2 GPUs, extraction on 1, GPU nodes picked by a label."""
    return compiled(tmp_path_factory, "finetune.enabled=true", "train.gpus=2", "extract.gpus=1",
                    "kfp.gpu_node_selector={gpu: h200}")


def executors(spec: dict, platform: dict) -> tuple[dict, dict]:
    return (spec["deploymentSpec"]["executors"],
            platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def test_ir_parses_as_kfp_protobufs_and_compiles_quickly(ir):
    text, spec, platform, seconds = ir
    assert seconds < 30
    parsed = json_format.ParseDict(spec, PipelineSpec())
    json_format.ParseDict(platform, PlatformSpec())
    assert parsed.pipeline_info.name == "mofe-ood"
    assert parsed.default_pipeline_root == "s3://mofe-ood/kfp"
    # Defaults are params.yaml's sections, nulls and ints as written; the GPU counts are ints
    # of their own, taken out of their sections.
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    params = load(ROOT / "params.yaml")
    for section in ("base", "evaluate", "train", "extract"):
        expected = {k: v for k, v in params[section].items() if k != "gpus"}
        assert json.loads(inputs[section]["defaultValue"]) == expected
    assert inputs["extract_gpus"]["parameterType"] == "NUMBER_INTEGER"
    assert inputs["train_gpus"]["defaultValue"] == params["train"]["gpus"] == 0
    # A container has no host folder: Fashion-MNIST comes from S3 (mofe push-raw).
    assert json.loads(inputs["prepare"]["defaultValue"])["fashion_mnist_dir"].startswith("s3://")


def _upstream(tasks: dict, name: str) -> set:
    seen, todo = set(), [name]
    while todo:
        for dep in tasks[todo.pop()].get("dependentTasks", []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_ir_of_one_shard_is_a_plain_five_step_dag(ir):
    """extract.shards: 1 (the default): no ParallelFor, no Collected: any KFP 2.x backend runs it."""
    text, spec, _, _ = ir
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(["validate", *STAGES])
    assert "parameterIterator" not in text and "isArtifactList" not in text
    chain = ["validate", *STAGES]
    for before, after in zip(chain, chain[1:]):
        assert before in _upstream(tasks, after), f"{before} must run before {after}"


def test_ir_has_what_the_kfp_ui_renders(ir):
    _, spec, _, _ = ir
    outputs = lambda name: {k: v["artifactType"]["schemaTitle"]  # noqa: E731
                            for k, v in spec["components"][f"comp-{name}"]["outputDefinitions"]["artifacts"].items()}
    assert outputs("evaluate") == {"reports": "system.Dataset", "metrics": "system.Metrics",
                                   "results": "system.Markdown", "roc": "system.ClassificationMetrics",
                                   "plots": "system.HTML"}
    assert outputs("train")["history"] == "system.Markdown"


def test_ir_of_shards_fans_out_and_in(tmp_path_factory):
    _, spec, _, _ = compiled(tmp_path_factory, "extract.shards=3")
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(name for name, t in tasks.items() if "parameterIterator" in t)
    assert list(spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]) == ["extract-shard"]
    chain = ["prepare", loop, "merge-features", "train", "evaluate", "register"]
    for before, after in zip(chain, chain[1:]):
        assert before in _upstream(tasks, after), f"{before} must run before {after}"
    assert "shard-indices" in _upstream(tasks, loop)


def test_ir_of_defaults_asks_for_no_gpu(ir):
    _, spec, platform, _ = ir
    specs, k8s = executors(spec, platform)
    for name, executor in specs.items():
        container = executor["container"]
        assert container["image"] == IMAGE
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        assert "accelerator" not in resources, name
        # The project image holds mofe_ood and kfp: nothing is pip-installed at start.
        assert "pip install" not in " ".join(container["command"]), name
    for name, executor in k8s.items():
        assert "tolerations" not in executor and "emptyDirMounts" not in executor, name
    assert k8s["exec-train"]["activeDeadlineSeconds"] == "86400"


def test_ir_asks_for_gpus_where_params_say(ir_gpu):
    _, spec, platform, _ = ir_gpu
    specs, k8s = executors(spec, platform)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["train_gpus"]["defaultValue"] == 2 and inputs["extract_gpus"]["defaultValue"] == 1
    for name, count in (("train", "train_gpus"), ("extract", "extract_gpus")):
        gpu = specs[f"exec-{name}"]["container"]["resources"]["accelerator"]
        # The limit is the integer pipeline parameter: the UI can change the count per run.
        assert gpu["resourceType"] == "nvidia.com/gpu"
        assert gpu["resourceCount"] == f"{{{{$.inputs.parameters['pipelinechannel--{count}']}}}}"
        task = spec["root"]["dag"]["tasks"][name]
        assert task["inputs"]["parameters"]["gpus"]["componentInputParameter"] == count
        assert k8s[f"exec-{name}"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s[f"exec-{name}"]["nodeSelector"]["labels"] == {"gpu": "h200"}
        (shm,) = k8s[f"exec-{name}"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    for name in ("exec-prepare", "exec-evaluate", "exec-register"):
        assert "accelerator" not in specs[name]["container"]["resources"], name


def test_two_commits_give_two_image_tags(tmp_path):
    """The image is tagged with the commit, so KFP's cache (image + arguments) cannot serve old code."""
    repo = tmp_path / "repo"
    for path in ("pipeline.py", "params.yaml", "components", "infra/image.sh"):
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = ["cp", "-r"] if (ROOT / path).is_dir() else ["cp"]
        subprocess.run([*copy, str(ROOT / path), str(target)], check=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@localhost", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    tags = []
    for message in ("one", "two"):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
        out = tmp_path / f"{message}.yaml"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MOFE_IMAGE", None)
        subprocess.run([sys.executable, "pipeline.py", "compile", "--out", str(out)], cwd=repo, env=env,
                       check=True, capture_output=True)
        images = {e["container"]["image"] for e in yaml.safe_load_all(out.read_text()).__next__()
                  ["deploymentSpec"]["executors"].values()}
        (image,) = images
        sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout
        assert image == f"mofe-ood:{sha.strip()}"
        tags.append(image)
    assert tags[0] != tags[1]


def test_ir_caches_and_retries_where_it_is_safe(ir):
    _, spec, _, _ = ir
    tasks = dict(spec["root"]["dag"]["tasks"])
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"prepare", "extract"}
    # Every step rewrites its own outputs (register: same content = same version): retry all
    # but validate, whose verdict a retry cannot change.
    assert {name for name, t in tasks.items() if "retryPolicy" not in t} == {"validate"}


def test_ir_names_secrets_but_holds_no_secret_value(ir):
    text, spec, platform, _ = ir
    assert FAKE_SECRET not in text
    # prepare reads raw data from S3, register talks to MLflow and S3: credentials from
    # infra/k8s's Secret, endpoints from its ConfigMap, by name only.
    _, k8s = executors(spec, platform)
    assert sorted(name for name, e in k8s.items() if "secretAsEnv" in e) == ["exec-prepare", "exec-register"]
    (secret,) = k8s["exec-register"]["secretAsEnv"]
    assert secret["secretName"] == "mofe-ood-s3"
    assert {m["envVar"] for m in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    (config,) = k8s["exec-register"]["configMapAsEnv"]
    assert config["configMapName"] == "mofe-ood-storage"
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= {m["envVar"] for m in config["keyToEnv"]}
    for executor in spec["deploymentSpec"]["executors"].values():
        assert not {e["name"] for e in executor["container"].get("env", [])} & {"AWS_SECRET_ACCESS_KEY"}


def test_ir_mounts_the_data_pvc_where_images_are_read(tmp_path_factory):
    _, spec, platform, _ = compiled(tmp_path_factory, "kfp.data_pvc=imagenet", "kfp.data_mount=/mnt/in")
    _, k8s = executors(spec, platform)
    mounted = {name for name, e in k8s.items() for m in e.get("pvcMount", [])
               if m.get("constant") == "imagenet" or m.get("pvcNameParameter", {}).get("runtimeValue", {})
               .get("constant") == "imagenet"}
    assert mounted == {"exec-prepare", "exec-extract", "exec-train"}


def test_register_gets_the_kfp_run_id_and_image(ir):
    _, spec, _, _ = ir
    inputs = spec["root"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["image"]["runtimeValue"]["constant"] == IMAGE


def test_components_take_the_sections_of_the_stage_table(ir):
    """Each step gets (and KFP caches it on) the sections its stage reads; dvc.yaml lists no
    other (tests/test_dvc_stages.py)."""
    _, spec, _, _ = ir
    for stage in stages.STAGES:
        inputs = spec["components"][f"comp-{stage.name}"]["inputDefinitions"]["parameters"]
        assert set(inputs) & set(stages.sections()) == set(stage.sections), stage.name


def test_pods_are_the_stage_tables(ir):
    _, spec, _, _ = ir
    for stage in stages.STAGES:
        resources = spec["deploymentSpec"]["executors"][f"exec-{stage.name}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == f"{stage.pod.cpu:g}"
        assert resources["resourceMemoryLimit"] == stage.pod.memory


# ------------------------------------------------------------------ a whole run on this machine


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_run):
    """`python pipeline.py run` on tiny params, every stage."""
    tmp = tmp_path_factory.mktemp("kfp")
    params = merged(tiny_run(), SHARDED)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = pipeline_py("run", "--params", tmp / "params.yaml", "--root", tmp / "root", env=env, timeout=600)
    (run,) = (tmp / "root").glob("mofe-ood-*")
    return params, run, done.stdout


@pytest.mark.slow
def test_local_run_shards_extraction_and_matches_unsharded_extract(local_run, tmp_path):
    params, run, stdout = local_run
    features = run / "merge-features" / "features"
    assert str(features) in stdout  # the CLI says where the artifacts landed
    shards = sorted(run.glob("for-loop-*/extract-shard/features"))
    assert len(shards) == 2
    extract.run(params, run / "prepare" / "prepared", tmp_path / "unsharded")
    info = json.loads((tmp_path / "unsharded" / "info.json").read_text())
    assert json.loads((features / "info.json").read_text()) == info
    for name in info["splits"]:
        merged_feats, merged_labels = extract.load_features(features, name)
        feats, labels = extract.load_features(tmp_path / "unsharded", name)
        assert merged_feats.dtype == feats.dtype and merged_labels.dtype == labels.dtype
        np.testing.assert_array_equal(merged_feats, feats, err_msg=name)
        np.testing.assert_array_equal(merged_labels, labels, err_msg=name)
    # The train split really was cut in two, at a batch boundary.
    rows = [json.loads((s / "info.json").read_text())["shard"]["rows"]["train"] for s in shards]
    assert sorted(rows) == [[0, 64], [64, info["splits"]["train"]["count"]]]


def fake_shards(root: Path, count: int = 10, shards: int = 3, batch: int = 2) -> tuple[list, np.ndarray]:
    """Shard folders as run_shard writes them, for `count` rows of 4-d features."""
    feats = np.arange(count * 4, dtype=np.float32).reshape(count, 4)
    info = {"backbone": "b", "feature_dim": 4, "classes": ["a"],
            "splits": {"train": {"kind": "id", "group": None, "count": count}}}
    dirs = []
    for i in range(shards):
        rows = extract.shard_rows(count, i, shards, batch)
        d = root / f"shard{i}"
        d.mkdir()
        np.savez(d / "train.npz", features=feats[rows.start:rows.stop],
                 labels=np.zeros(len(rows), np.int64))
        shard = {"index": i, "shards": shards, "rows": {"train": [rows.start, rows.stop]}}
        (d / "info.json").write_text(json.dumps({**info, "shard": shard}))
        dirs.append(d)
    return dirs, feats


def test_merge_joins_shards_in_index_order_and_refuses_a_partial_set(tmp_path):
    dirs, feats = fake_shards(tmp_path)
    info = extract.merge_shards(dirs[::-1], tmp_path / "merged")  # any order in, index order out
    assert "shard" not in info
    np.testing.assert_array_equal(extract.load_features(tmp_path / "merged", "train")[0], feats)
    with pytest.raises(ValueError, match=r"got shards \[0, 1\] of \[3\]"):
        extract.merge_shards(dirs[:2], tmp_path / "partial")
    with pytest.raises(ValueError, match="got shards \\[0, 1, 1\\]"):
        extract.merge_shards([dirs[0], dirs[1], dirs[1]], tmp_path / "twice")
    assert not (tmp_path / "partial").exists() and not (tmp_path / "twice").exists()


def test_shards_tile_every_split_in_whole_batches():
    for count, batch, shards in [(0, 4, 2), (3, 16, 2), (17, 16, 2), (100, 7, 3), (10000, 64, 4)]:
        rows = [extract.shard_rows(count, i, shards, batch) for i in range(shards)]
        assert rows[0].start == 0 and rows[-1].stop == count
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
        assert all(r.start % batch == 0 for r in rows)


@pytest.mark.slow
def test_local_run_writes_the_metrics_dvc_repro_writes(local_run, tiny_project, tiny_variant):
    params, run, _ = local_run
    # The same params through the stage functions `dvc repro` runs (shared with other tests).
    expected = json.loads((tiny_project / "reports" / "metrics.json").read_text())
    got = json.loads((run / "evaluate" / "reports" / "metrics.json").read_text())

    def keys(tree, prefix=""):
        return {prefix + k for k in tree} | {x for k, v in tree.items() if isinstance(v, dict)
                                             for x in keys(v, f"{prefix}{k}/")}

    assert keys(got) == keys(expected)
    # ... and the KFP UI shows the headline: the registered variant at its default score, and
    # the best other (variant, score); results.md, the ROC curve and the plots render there too.
    logged = json.loads((run / "evaluate" / "executor_output.json").read_text())["artifacts"]
    (metrics,) = logged["metrics"]["artifacts"]
    variant = tiny_variant
    assert metrics["metadata"][f"{variant}/near_auroc"] == got[variant]["knn"]["near"]["auroc"]
    assert metrics["metadata"][f"{variant}/id_accuracy"] == got[variant]["id_accuracy"]
    assert metrics["metadata"]["best_baseline/name"].startswith("frozen/")
    assert len(metrics["metadata"]) < 20
    (roc,) = logged["roc"]["artifacts"]
    curve = roc["metadata"]["confidenceMetrics"]
    assert curve[0]["falsePositiveRate"] <= curve[-1]["falsePositiveRate"] and len(curve) > 10
    assert (run / "evaluate" / "results").read_text() == (run / "evaluate" / "reports" / "results.md").read_text()
    page = (run / "evaluate" / "plots").read_text()
    assert page.count("data:image/png;base64,") == len(list((run / "evaluate" / "reports" / "plots").glob("*.png")))
    history = (run / "train" / "history").read_text()
    assert f"## {variant}" in history and "| epoch | phase | loss | val_accuracy |" in history


@pytest.mark.slow
def test_local_run_registers_the_model(local_run):
    params, run, _ = local_run
    registration = json.loads((run / "register" / "registration").read_text())
    assert registration["version"] == 1 and registration["model_name"] == params["register"]["model_name"]


# ------------------------------------------------------------------ submit to a KFP endpoint


class StubKFP(BaseHTTPRequestHandler):
    """The KFP v2beta1 API calls `kfp.Client` makes to upload a pipeline version and start a run."""

    requests: list = []
    version = "2.14.3"  # what healthz says (tag_name)
    versions: list = []  # pipeline versions uploaded so far

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        if self.path.startswith(("/apis/v2beta1/healthz", "/apis/v1beta1/healthz")):
            return self._reply({"multi_user": False, "tag_name": self.version})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        if self.path.startswith("/apis/v2beta1/pipelines/pipe-1/versions"):
            return self._reply({"pipeline_versions": self.versions, "total_size": len(self.versions)})
        if self.path.startswith("/apis/v2beta1/pipelines"):
            found = [{"pipeline_id": "pipe-1", "display_name": "mofe-ood"}] if self.versions else []
            return self._reply({"pipelines": found, "total_size": len(found)})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Type", "").startswith("multipart"):  # an uploaded pipeline file
            body = {"yaml": raw.decode(errors="replace")}
        else:
            body = json.loads(raw or b"{}")
        self.requests.append(("POST", self.path.split("?")[0], body))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path.startswith("/apis/v2beta1/pipelines/upload_version"):
            name = self.path.split("name=")[1].split("&")[0]
            version = {"pipeline_id": "pipe-1", "pipeline_version_id": f"ver-{len(self.versions) + 1}",
                       "display_name": name}
            self.versions.append(version)
            return self._reply(version)
        if self.path.startswith("/apis/v2beta1/pipelines/upload"):
            self.versions.append({"pipeline_id": "pipe-1", "pipeline_version_id": "ver-0",
                                  "display_name": "mofe-ood"})
            return self._reply({"pipeline_id": "pipe-1", "display_name": "mofe-ood"})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": f"run-{len(self.requests)}", "experiment_id": body["experiment_id"],
                                "display_name": body["display_name"], "state": "PENDING"})
        self._reply({"error": "not found"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_kfp():
    StubKFP.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubKFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Timer(120, server.shutdown)  # bounded even if the test hangs
    stop.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", StubKFP.requests
    stop.cancel()
    server.shutdown()
    server.server_close()


def test_submit_uploads_a_version_named_by_the_commit_and_runs_it(stub_kfp, tmp_path):
    host, requests = stub_kfp
    StubKFP.versions = []
    for _ in range(2):  # the same commit twice: one pipeline version, two runs of it
        done = pipeline_py("submit", "--host", host, "--experiment", "mofe-test",
                           "--set", "base.seed=7", "--set", "extract.shards=4",
                           env={"HOME": str(tmp_path)}, timeout=120)
        assert done.stdout.strip().splitlines()[-1].startswith("run-")
    posts = [(path, body) for method, path, body in requests if method == "POST"]
    uploads = [body["yaml"] for path, body in posts if path == "/apis/v2beta1/pipelines/upload_version"]
    assert len(uploads) == 1 and IMAGE in uploads[0] and FAKE_SECRET not in uploads[0]
    version = StubKFP.versions[-1]
    assert version["display_name"] == "mofe-ood-" + IMAGE.rsplit(":", 1)[1]
    runs = [body for path, body in posts if path == "/apis/v2beta1/runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["experiment_id"] == "exp-1"
        assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-1",
                                                     "pipeline_version_id": version["pipeline_version_id"]}
        arguments = run["runtime_config"]["parameters"]
        assert json.loads(arguments["base"]) == {"seed": 7} and json.loads(arguments["extract"])["shards"] == 4
        assert arguments["train_gpus"] == 0
        assert json.loads(arguments["prepare"]) == {**load(ROOT / "params.yaml")["prepare"],
                                                    "fashion_mnist_dir": "s3://mofe-ood/raw/fashion-mnist"}
    assert FAKE_SECRET not in json.dumps(requests)


def test_submit_of_shards_refuses_a_too_old_server_before_uploading(stub_kfp, tmp_path):
    host, requests = stub_kfp
    StubKFP.version = "2.3.0"
    try:
        done = subprocess.run([sys.executable, "pipeline.py", "submit", "--host", host,
                               "--set", "extract.shards=4"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "MOFE_IMAGE": IMAGE, "HOME": str(tmp_path)})
    finally:
        StubKFP.version = "2.14.3"
    assert done.returncode == 2
    assert "backend >= 2.5.0" in done.stderr and "runs 2.3.0" in done.stderr
    assert "extract.shards: 1" in done.stderr
    assert not [r for r in requests if r[0] == "POST"]


def test_the_validate_step_names_every_bad_key_of_a_run(tmp_path):
    """What the first step does with sections edited in the Runs UI (a typo, a bad value)."""
    from components.validate import validate
    from mofe_ood.params import ParamError

    import pipeline

    params = load(ROOT / "params.yaml")
    arguments = pipeline.arguments(params, "cluster")
    validate.python_func(**arguments, reference=json.dumps(params))
    bad = {**arguments, "register": json.dumps({**params["register"], "modle_name": "x"}),
           "train": json.dumps({**params["train"], "epochs": -1}), "extract_gpus": -2}
    with pytest.raises(ParamError) as err:
        validate.python_func(**bad, reference=json.dumps(params))
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "register.modle_name: not a known key (did you mean register.model_name?)" in message
    assert "train.epochs: -1 is below the minimum 1" in message and "extract.gpus: -2" in message
