"""The Kubeflow pipeline (pipeline.py, components/): its IR, a whole local run, and submit."""

import importlib.util
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

from mofe_ood import extract
from mofe_ood.params import load, merged
from tests import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "extract", "train", "evaluate", "register"]
# tests/tiny_pipeline.py's run, extraction in 2 shards of whole batches of 64 images.
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


def available(stage: str) -> bool:
    return importlib.util.find_spec(f"mofe_ood.{stage}") is not None


# ------------------------------------------------------------------ the compiled IR


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    start = time.perf_counter()
    pipeline_py("compile", "--out", out)
    seconds = time.perf_counter() - start
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform, seconds


def test_ir_parses_as_kfp_protobufs_and_compiles_quickly(ir):
    text, spec, platform, seconds = ir
    assert seconds < 30
    parsed = json_format.ParseDict(spec, PipelineSpec())
    json_format.ParseDict(platform, PlatformSpec())
    assert parsed.pipeline_info.name == "mofe-ood"
    assert parsed.default_pipeline_root == "s3://mofe-ood/kfp"
    # Defaults are params.yaml's sections, nulls and ints as written.
    defaults = {name: json.loads(p["defaultValue"])
                for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    params = load(ROOT / "params.yaml")
    for section in ("base", "prepare", "extract", "evaluate"):
        assert defaults[section] == params[section]


def _upstream(tasks: dict, name: str) -> set:
    seen, todo = set(), [name]
    while todo:
        for dep in tasks[todo.pop()].get("dependentTasks", []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_ir_runs_the_stages_in_order(ir):
    _, spec, _, _ = ir
    tasks = spec["root"]["dag"]["tasks"]
    # `extract` runs inside the ParallelFor group: stand the group in for it.
    loop = next(name for name, t in tasks.items() if "parameterIterator" in t)
    assert list(spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]) == ["extract"]
    chain = ["prepare", loop, "merge-features", "train", "evaluate", "register"]
    for before, after in zip(chain, chain[1:]):
        assert before in _upstream(tasks, after), f"{before} must run before {after}"
    assert "shard-indices" in _upstream(tasks, loop)


def test_ir_asks_the_cluster_for_a_gpu_on_train_only(ir):
    _, spec, _, _ = ir
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        gpu = resources.get("accelerator")
        if name == "exec-train":
            assert gpu["resourceType"] == "nvidia.com/gpu" and gpu["resourceCount"] == "1"
        else:
            assert gpu is None, name
        # The project image holds mofe_ood and kfp: nothing is pip-installed at start.
        assert "pip install" not in " ".join(container["command"]), name


def test_ir_caches_and_retries_where_it_is_safe(ir):
    _, spec, _, _ = ir
    tasks = dict(spec["root"]["dag"]["tasks"])
    for group in spec["components"].values():
        tasks.update(group.get("dag", {}).get("tasks", {}))
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert {"prepare", "extract", "merge-features"} <= cached
    assert not cached & {"train", "evaluate", "register"}
    # Every step rewrites its own outputs (register: same content = same version): retry all.
    assert all("retryPolicy" in t for name, t in tasks.items() if not name.startswith("for-loop"))


def test_ir_names_secrets_but_holds_no_secret_value(ir):
    text, spec, platform, _ = ir
    assert FAKE_SECRET not in text
    # register talks to MLflow and S3: credentials from infra/k8s's Secret, endpoints from its
    # ConfigMap, by name only.
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [name for name, e in executors.items() if "secretAsEnv" in e] == ["exec-register"]
    assert executors["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    (secret,) = executors["exec-register"]["secretAsEnv"]
    assert secret["secretName"] == "mofe-ood-s3"
    assert {m["envVar"] for m in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    (config,) = executors["exec-register"]["configMapAsEnv"]
    assert config["configMapName"] == "mofe-ood-storage"
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= {m["envVar"] for m in config["keyToEnv"]}
    for executor in spec["deploymentSpec"]["executors"].values():
        assert not {e["name"] for e in executor["container"].get("env", [])} & {"AWS_SECRET_ACCESS_KEY"}


def test_components_take_the_params_sections_dvc_yaml_lists(ir):
    """Each step gets (and KFP caches it on) the sections its DVC stage depends on."""
    _, spec, _, _ = ir
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, body in stages.items():
        inputs = spec["components"][f"comp-{stage}"]["inputDefinitions"]["parameters"]
        listed = {p.split(".")[0] for p in body.get("params", []) if isinstance(p, str)}
        assert listed <= set(inputs), f"{stage}: dvc.yaml lists {listed}, component takes {set(inputs)}"


# ------------------------------------------------------------------ a whole run on this machine


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`python pipeline.py run` on tiny params, as far as the stages written so far go."""
    tmp = tmp_path_factory.mktemp("kfp")
    params = merged(tiny_pipeline.tiny_params(), SHARDED)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    until = "extract"
    for stage in STAGES[2:]:
        if not available(stage):
            break
        until = stage
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = pipeline_py("run", "--params", tmp / "params.yaml", "--root", tmp / "root",
                       "--until", until, env=env, timeout=600)
    (run,) = (tmp / "root").glob("mofe-ood-*")
    return params, run, until, done.stdout


@pytest.mark.slow
def test_local_run_shards_extraction_and_matches_unsharded_extract(local_run, tmp_path):
    params, run, _, stdout = local_run
    features = run / "merge-features" / "features"
    assert str(features) in stdout  # the CLI says where the artifacts landed
    shards = sorted(run.glob("for-loop-*/extract/features"))
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
def test_local_run_writes_the_metrics_dvc_repro_writes(local_run, tmp_path_factory):
    params, run, until, _ = local_run
    if STAGES.index(until) < STAGES.index("evaluate"):
        pytest.skip("mofe_ood.train / mofe_ood.evaluate not written yet: pipeline run stops at "
                    f"{until!r}")
    # The same params through the stage functions `dvc repro` runs (shared with other tests).
    expected = json.loads((tiny_pipeline.build(tmp_path_factory) / "reports" / "metrics.json").read_text())
    got = json.loads((run / "evaluate" / "reports" / "metrics.json").read_text())

    def keys(tree, prefix=""):
        return {prefix + k for k in tree} | {x for k, v in tree.items() if isinstance(v, dict)
                                             for x in keys(v, f"{prefix}{k}/")}

    assert keys(got) == keys(expected)
    # ... and the KFP UI shows them: the Metrics artifact holds them flattened.
    logged = json.loads((run / "evaluate" / "executor_output.json").read_text())
    (metrics,) = logged["artifacts"]["metrics"]["artifacts"]
    variant = tiny_pipeline.VARIANT
    assert metrics["metadata"][f"{variant}/knn/near/auroc"] == got[variant]["knn"]["near"]["auroc"]


@pytest.mark.slow
def test_local_run_registers_the_model(local_run):
    params, run, until, _ = local_run
    if until != "register":
        pytest.skip(f"mofe_ood.register not written yet: pipeline run stops at {until!r}")
    registration = json.loads((run / "register" / "registration").read_text())
    assert registration["version"] == 1 and registration["model_name"] == params["register"]["model_name"]


# ------------------------------------------------------------------ submit to a KFP endpoint


class StubKFP(BaseHTTPRequestHandler):
    """The few KFP v2beta1 API calls `kfp.Client` makes to start a run."""

    requests: list = []

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-1", "experiment_id": body["experiment_id"],
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


def test_submit_sends_the_pipeline_and_its_arguments(stub_kfp, tmp_path):
    host, requests = stub_kfp
    done = pipeline_py("submit", "--host", host, "--experiment", "mofe-test",
                       "--set", "base.seed=7", "--set", "extract.shards=4",
                       env={"HOME": str(tmp_path)}, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "run-1"
    posts = {path: body for method, path, body in requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "mofe-test"
    run = posts["/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "mofe-ood"
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    arguments = {k: json.loads(v) for k, v in run["runtime_config"]["parameters"].items()}
    assert arguments["base"] == {"seed": 7} and arguments["extract"]["shards"] == 4
    assert arguments["prepare"] == load(ROOT / "params.yaml")["prepare"]
    assert FAKE_SECRET not in json.dumps(requests)
