"""The Kubeflow pipeline (pipeline.py, components/): its IR, a whole local run, and submit."""

import json
import os
import subprocess
import sys
import time
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
    """Fine-tuning on 2 GPUs, extraction on 1, GPU nodes picked by a label, on a backend >= 2.3.0."""
    return compiled(tmp_path_factory, "finetune.enabled=true", "train.gpus=2", "extract.gpus=1",
                    "kfp.gpu_node_selector={gpu: h200}", "kfp.backend=2.3.0")


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
    # Defaults are params.yaml's sections as written (nulls and ints, the GPU counts included),
    # and prepare's one key of evaluate: nothing rewritten.
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    params = load(ROOT / "params.yaml")
    for section in stages.sections():
        assert json.loads(inputs[section]["defaultValue"]) == params[section], section
    assert json.loads(inputs["evaluate__extra_ood"]["defaultValue"]) == params["evaluate"]["extra_ood"]
    assert set(inputs) == {*stages.sections(), "evaluate__extra_ood"}
    # A container has no host folder: Fashion-MNIST comes from S3 (mofe push-raw), said by env.
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-prepare"]["container"]["env"]}
    assert env["FASHION_MNIST_DIR"].startswith("s3://") and env["MOFE_IMAGE"] == IMAGE


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
    assert json.loads(inputs["train"]["defaultValue"])["gpus"] == 2
    for name, count in (("train", 2), ("extract", 1)):
        gpu = specs[f"exec-{name}"]["container"]["resources"]["accelerator"]
        # A literal limit, from the section (backends before 2.4.0 read no parameter there);
        # the validate step refuses a run whose section says another count.
        assert gpu["type"] == "nvidia.com/gpu" and gpu["count"] == str(count)
        assert k8s[f"exec-{name}"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s[f"exec-{name}"]["nodeSelector"]["labels"] == {"gpu": "h200"}
        (shm,) = k8s[f"exec-{name}"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    for name in ("exec-prepare", "exec-evaluate", "exec-register"):
        assert "accelerator" not in specs[name]["container"]["resources"], name


def test_two_commits_give_two_image_tags(tmp_path):
    """The image is tagged with the commit, so KFP's cache (image + arguments) cannot serve old code."""
    repo = tmp_path / "repo"
    for path in ("pipeline.py", "params.yaml", "components", "kfpipe", "infra/image.sh"):
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
    # A file git does not track, in the package the image copies: not that commit's code.
    tag = ["bash", str(repo / "infra" / "image.sh"), "tag"]
    (repo / "mofe_ood").mkdir()
    (repo / "mofe_ood" / "new.py").write_text("")
    assert subprocess.run(tag, capture_output=True, text=True).stdout.strip().endswith("-dirty")
    (repo / "mofe_ood" / "new.py").unlink()
    (repo / "notes.txt").write_text("")  # outside the package: not in the image
    assert not subprocess.run(tag, capture_output=True, text=True).stdout.strip().endswith("-dirty")


def test_ir_caches_and_retries_where_it_is_safe(ir):
    _, spec, _, _ = ir
    tasks = dict(spec["root"]["dag"]["tasks"])
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"prepare", "extract"}
    # Retries need a backend >= 2.4.1: not in the default IR (kfp.backend 2.2.0).
    assert not [name for name, t in tasks.items() if "retryPolicy" in t]


def test_ir_retries_where_it_is_safe_when_the_backend_can(tmp_path_factory):
    _, spec, _, _ = compiled(tmp_path_factory, "kfp.backend=2.4.1")
    tasks = dict(spec["root"]["dag"]["tasks"])
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
    # The older form only (secretName): 2.2.0-2.4.0 drivers fail a step on secretNameParameter.
    assert secret["secretName"] == "mofe-ood-s3" and "secretNameParameter" not in secret
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
               if m == {"constant": "imagenet", "mountPath": "/mnt/in"}}
    assert mounted == {"exec-prepare", "exec-extract", "exec-train"}


def test_checkpoints_of_container_steps_must_be_on_the_data_pvc(tmp_path):
    """A pod runs as the image's user (10001): /app (where a relative path lands) is not its, and
    only a PVC outlives a retried pod. Compile refuses anything else, naming the key, the value
    and what is allowed; the same folder on the PVC compiles."""
    def compile_with(*sets):
        return subprocess.run([sys.executable, "pipeline.py", "compile", "--out", tmp_path / "ir.yaml",
                               *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "MOFE_IMAGE": IMAGE}, timeout=300)

    relative = compile_with("finetune.checkpoint_dir=checkpoints/finetune", "kfp.data_pvc=ckpt")
    assert relative.returncode == 2
    assert ("finetune.checkpoint_dir: 'checkpoints/finetune' is not on the data PVC: in a container a "
            "relative path lands under /app") in relative.stderr
    assert "a folder under kfp.data_mount (/data, e.g. /data/checkpoints/finetune)" in relative.stderr
    no_pvc = compile_with("train.checkpoint_dir=/data/checkpoints/train")
    assert no_pvc.returncode == 2
    assert "train.checkpoint_dir: '/data/checkpoints/train' needs kfp.data_pvc (null)" in no_pvc.stderr
    outside = compile_with("train.checkpoint_dir=/tmp/ckpt", "kfp.data_pvc=ckpt")
    assert outside.returncode == 2 and "train.checkpoint_dir: '/tmp/ckpt' is not on the data PVC" in outside.stderr
    on_pvc = compile_with("finetune.checkpoint_dir=/mnt/in/ckpt/finetune", "kfp.data_pvc=ckpt",
                          "kfp.data_mount=/mnt/in")
    assert on_pvc.returncode == 0, on_pvc.stderr
    _, k8s = executors(*yaml.safe_load_all((tmp_path / "ir.yaml").read_text()))
    assert {"constant": "ckpt", "mountPath": "/mnt/in"} in k8s["exec-train"]["pvcMount"]
    # DVC and the subprocess runner write where the project is: a relative folder is fine there.
    import pipeline

    params = merged(load(ROOT / "params.yaml"), {"finetune": {"checkpoint_dir": "checkpoints/finetune"}})
    pipeline.build(params, runner="subprocess")


def test_register_gets_the_kfp_run_id_and_image_as_env(ir):
    """Lineage, not inputs: the pod's `pipeline/runid` label (every backend from 2.2.0 sets it)."""
    _, spec, platform, _ = ir
    _, k8s = executors(spec, platform)
    run_id = {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"}
    assert run_id in k8s["exec-register"]["fieldPathAsEnv"]
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-register"]["container"]["env"]}
    assert env["MOFE_IMAGE"] == IMAGE
    assert "{{$.pipeline_job" not in json.dumps(spec)  # job placeholders need a 2.5.0 backend


def test_components_take_the_sections_of_the_stage_table(ir):
    """Each step gets (and KFP caches it on) the sections its stage reads; dvc.yaml lists no
    other (tests/test_dvc_stages.py)."""
    import pipeline

    _, spec, _, _ = ir
    for stage in stages.STAGES:
        inputs = spec["components"][f"comp-{stage.name}"]["inputDefinitions"]["parameters"]
        assert set(inputs) == pipeline.stage_inputs(stage), stage.name
    # validate reads every pipeline parameter (and the compiled params): none escapes its check
    validate = spec["components"]["comp-validate"]["inputDefinitions"]["parameters"]
    assert set(validate) == {*spec["root"]["inputDefinitions"]["parameters"], "reference"}


def test_the_pipeline_function_wires_every_stage_of_the_table_with_its_sections(ir, tmp_path_factory):
    """The pipeline function is written by hand (pipeline.py build): its tasks are the table's
    stages, in its order, each given exactly its stage's sections; a disagreement is caught."""
    import copy

    import pipeline

    _, spec, _, _ = ir
    tasks = spec["root"]["dag"]["tasks"]
    assert pipeline.wiring_problems(spec) == []
    assert set(tasks) == {"validate", *STAGES}
    assert all(before in _upstream(tasks, after) for before, after in zip(STAGES, STAGES[1:]))  # in order
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == set(pipeline.arguments(load(ROOT / "params.yaml")))
    _, sharded, _, _ = compiled(tmp_path_factory, "extract.shards=2")
    assert pipeline.wiring_problems(sharded, sharded=True) == []
    # What a hand-written function can get wrong: a section from another parameter, a stage
    # left out, a section too many.
    wrong = copy.deepcopy(spec)
    wrong["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["finetune"] = {"componentInputParameter": "train"}
    del wrong["root"]["dag"]["tasks"]["register"]
    wrong["root"]["dag"]["tasks"]["extract"]["inputs"]["parameters"]["evaluate"] = {
        "componentInputParameter": "evaluate"}
    problems = pipeline.wiring_problems(wrong)
    assert len(problems) == 3, problems
    assert "task 'train' takes" in problems[1] and "'finetune': 'train'" in problems[1]
    assert "task 'extract' takes" in problems[0] and "but its stage reads ['base', 'extract']" in problems[0]
    assert problems[2] == "stage 'register' has no task in the pipeline function"
    assert pipeline.wiring_problems(spec, until="train") == [
        "task 'evaluate' is no stage of the table (or comes after --until train)",
        "task 'register' is no stage of the table (or comes after --until train)"]


def stage_inputs(params: dict, out: Path) -> dict[str, dict]:
    """Each stage's parameter inputs in the IR of `params`, resolved to values (what KFP caches
    a step on and what the step reads)."""
    import pipeline

    spec = next(yaml.safe_load_all(pipeline.compile_ir(params, out).read_text()))
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    tasks = spec["root"]["dag"]["tasks"]
    return {name: {key: defaults[value["componentInputParameter"]] if "componentInputParameter" in value
                   else value["runtimeValue"]["constant"]
                   for key, value in tasks[name]["inputs"].get("parameters", {}).items()}
            for name in STAGES}


def changed(key: str, value):
    """Another value of the same kind (validity aside: the check is patched out below)."""
    # Values the Kfp config checks even with validation patched out: another valid one.
    if key == "kfp.backend":
        return "2.14.0"
    if key == "kfp.image_pull_policy":
        return "Always"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, list):
        return value + value[:1] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "x": "y"}
    return "x"  # null


def test_a_key_changes_the_inputs_of_exactly_the_stages_that_read_it(tmp_path, monkeypatch):
    """One cache rule for KFP and DVC: an evaluate.* key changes the inputs of evaluate and
    register only (and of prepare, for the keys it reads: Stage.partial); a kfp.* key shapes
    the pods and changes no stage's inputs."""

    monkeypatch.setenv("MOFE_IMAGE", IMAGE)
    monkeypatch.delenv("MOFE_PIPELINE_ROOT", raising=False)
    monkeypatch.setattr("mofe_ood.validate.run", lambda *args, **kwargs: None)  # wiring, not values
    monkeypatch.setattr("kfpipe.pods.image_tag", lambda: "test")
    params = load(ROOT / "params.yaml")
    base = stage_inputs(params, tmp_path / "base.yaml")
    partial = {read: stage.name for stage in stages.STAGES for read in stage.partial}
    for section, readers in (("evaluate", {"evaluate", "register"}), ("kfp", set())):
        for key, value in params[section].items():
            other = stage_inputs(merged(params, {section: {key: changed(f"{section}.{key}", value)}}),
                                 tmp_path / f"{section}.{key}.yaml")
            expected = readers | ({partial[f"{section}.{key}"]} if f"{section}.{key}" in partial else set())
            assert {name for name in STAGES if other[name] != base[name]} == expected, f"{section}.{key}"
    if "kfp" in params:  # the image reaches no input either, with MOFE_IMAGE out of the way
        monkeypatch.delenv("MOFE_IMAGE")
        other = stage_inputs(merged(params, {"kfp": {"image": "elsewhere/mofe-ood"}}), tmp_path / "image.yaml")
        assert other == base


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
    # In a process of its own, as each step ran: a convolution's float bits change with torch's
    # thread count, which earlier tests of this process may have set.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([sys.executable, "-c", "import sys, yaml; from mofe_ood import extract; "
                    "extract.run(yaml.safe_load(open(sys.argv[1])), sys.argv[2], sys.argv[3])",
                    str(tmp_path / "params.yaml"), str(run / "prepare" / "prepared"), str(tmp_path / "unsharded")],
                   check=True, cwd=Path(__file__).resolve().parents[1])
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
    val = json.loads((run / "evaluate" / "reports" / "metrics_val.json").read_text())
    best = max(((v, s) for v in val if v != variant for s, m in val[v].items() if isinstance(m, dict)
                and "selection" in m), key=lambda vs: val[vs[0]][vs[1]]["selection"])
    assert metrics["metadata"]["best_baseline/name"] == "/".join(best)  # chosen on validation
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
    # Lineage as env, not inputs: the local run's id (a cluster's: the pod label pipeline/runid).
    import mlflow

    tags = mlflow.MlflowClient(f"sqlite:///{run.parents[1]}/mlflow.db").get_run(registration["run_id"]).data.tags
    assert tags["kfp_run_id"].startswith("local-")


# ------------------------------------------------------------------ the validate step


def test_the_validate_step_names_every_bad_key_of_a_run(tmp_path):
    """What the first step does with sections edited in the Runs UI (a typo, a bad value)."""
    from components.validate import validate
    from mofe_ood.params import ParamError

    import pipeline

    params = load(ROOT / "params.yaml")
    arguments = pipeline.arguments(params)
    validate.python_func(**arguments, reference=json.dumps(params))
    bad = {**arguments, "register": json.dumps({**params["register"], "modle_name": "x"}),
           "train": json.dumps({**params["train"], "epochs": -1}),
           "extract": json.dumps({**params["extract"], "gpus": -2})}
    with pytest.raises(ParamError) as err:
        validate.python_func(**bad, reference=json.dumps(params))
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "register.modle_name: not a known key (did you mean register.model_name?)" in message
    assert "train.epochs: -1 is below the minimum 1" in message and "extract.gpus: -2" in message
    # What a run cannot change: the GPU count compiled into the pods, and one key given twice.
    other = {**arguments, "train": json.dumps({**params["train"], "gpus": 1}), "evaluate__extra_ood": '{"x": 1}'}
    with pytest.raises(ParamError) as err:
        validate.python_func(**other, reference=json.dumps(params))
    message = str(err.value)
    assert "train.gpus: 1, but the pipeline was compiled with 0" in message and "--set train.gpus=1" in message
    assert "evaluate__extra_ood: {\"x\": 1} differs from evaluate.extra_ood: {}" in message
