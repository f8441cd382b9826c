"""The MoFE OOD pipeline on Kubeflow: the stages of dvc.yaml as containerized steps.

    python pipeline.py compile [--out pipeline.yaml]             # the IR to upload to a cluster
    python pipeline.py run [--runner docker] [--image IMAGE]      # the whole pipeline here
    python pipeline.py submit --host URL [--experiment NAME]     # a run on a KFP endpoint

    validate -> prepare -> extract -> train -> evaluate -> register           (extract.shards: 1)
    validate -> prepare -> extract x N (ParallelFor) -> merge_features -> ...  (extract.shards: N > 1, KFP >= 2.14.0)

The IR runs on KFP backends from 2.2.0 (Kubeflow 1.9) on: it carries a feature of a newer
backend only where the params ask for it (extract.shards > 1; `kfp.backend` at or above a
feature's version: retries 2.4.1, a memory-backed /dev/shm on GPU steps 2.3.0), and `submit`
refuses an IR the server is too old for (kfpipe/backends.py has the features and their sources).

The steps after `validate` are the stage table's (mofe_ood/stages.py: names, order,
sections, pods); each step takes its inputs by name from the params sections, the GPU
counts and the outputs of the steps before it, so a new stage needs no change here.
`validate` checks every section at once (mofe validate) and fails the run in seconds;
compile, run and submit run the same check here first.

Each params.yaml section a stage reads (base, prepare, ...) is one pipeline parameter,
the section as JSON text, its default the file's value, and each step takes exactly what
its stage reads (`section__key` where it reads one key of a section: Stage.partial), so
KFP's cache and DVC's re-run the same stages on a change. `--params` takes params.yaml or a
preset, `--set` changes the values. `<stage>.gpus` stays in its section (the validate step
checks that a run's count is the one compiled into the pods' GPU limit). The `kfp` section
(image, pipeline_root, GPU node settings, data PVC, train timeout, backend) is read when
compiling: it shapes the pods (and their env), never a step's inputs. MOFE_IMAGE and
MOFE_PIPELINE_ROOT override `kfp.image` and `kfp.pipeline_root`; an image without
a tag gets the checkout's (infra/image.sh tag: the commit), so a new commit is a new
image string and KFP's cache cannot serve old code.

Runners of `run`: `subprocess` (default; every step a process of this Python, no
image) and `docker` (kfp's DockerRunner: every step in the image, through the
Docker API at $DOCKER_HOST, e.g. podman's: infra/image.sh api start). A docker run
reads raw data from S3, as a cluster does (mofe push-raw; see README).
"""

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.extract import extract_shard, merge_features, shard_indices
from components.validate import validate as validate_params
from kfpipe import backends, server
from mofe_ood import stages
from mofe_ood.cli import USER_ERRORS, parse_set
from mofe_ood.params import ParamError, load, merged
from mofe_ood.stages import Kfp, Resources

ROOT = Path(__file__).resolve().parent
NAME = server.NAME
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
RUNNERS = ("subprocess", "docker")
# infra/k8s's Secret and ConfigMap (they must exist in the namespace the runs use), and the
# resource name of a GPU in the cluster.
SECRET, CONFIG_MAP, GPU_TYPE = "mofe-ood-s3", "mofe-ood-storage", "nvidia.com/gpu"
# What a step that talks to S3 or MLflow gets as env, each key under its own name. Only
# these names reach the IR, never a value.
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CONFIG_KEYS = ("S3_ENDPOINT_URL", "S3_BUCKET", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
               "AWS_DEFAULT_REGION")
# MLflow's basic auth (infra/k8s/mlflow-auth): from the Secret `kfp.mlflow_auth_secret` where set.
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Steps of the pipeline that are not stages of mofe_ood.stages (their pods; a stage's is in the table).
STEP_PODS = {
    "validate": Resources(0.5, "2Gi", retries=0),  # a bad param stays bad on a retry
    "shard-indices": Resources(0.1, "256Mi", cache=True),
    "extract-shard": stages.get("extract").pod,
    "merge-features": Resources(1, "8Gi", cache=True),
}


def pods() -> dict[str, Resources]:
    """Every step's pod, by KFP component name."""
    return {**{stage.name: stage.pod for stage in stages.STAGES}, **STEP_PODS}


def image_tag() -> str:
    """The checkout's image tag (`make image` builds the same): the short commit, -dirty if dirty."""
    done = subprocess.run(["bash", str(ROOT / "infra" / "image.sh"), "tag"], capture_output=True, text=True)
    if done.returncode:
        raise ParamError(done.stderr.strip() or "infra/image.sh tag failed")
    return done.stdout.strip()


def with_tag(image: str) -> str:
    """`image` as given when it has a tag or digest, else with the checkout's tag."""
    if "@" in image or ":" in image.rsplit("/", 1)[-1]:
        return image
    return f"{image}:{image_tag()}"


def cluster_settings(params: dict, image: str | None = None) -> Kfp:
    """The `kfp` section, with $MOFE_IMAGE / $MOFE_PIPELINE_ROOT over it and the image tagged."""
    settings = stages.kfp_config(params)
    env = {"image": "MOFE_IMAGE", "pipeline_root": "MOFE_PIPELINE_ROOT"}
    settings = dataclasses.replace(settings, **{key: os.environ[var] for key, var in env.items()
                                                if os.environ.get(var)})
    return dataclasses.replace(settings, image=with_tag(image or settings.image))


def gpus(params: dict) -> dict[str, int]:
    """`<stage>.gpus` of each stage that can have GPUs (extract, train): 0 (the default) is none."""
    from mofe_ood.params import check_number

    return {stage.name: check_number(f"{stage.name}.gpus", params[stage.name]["gpus"], low=0, integer=True)
            for stage in stages.STAGES if stage.pod.gpus}


def pod_env(params: dict, settings: Kfp) -> dict[str, str]:
    """What every container step gets as env: where the raw Fashion-MNIST is (a container has no
    host folder; prepare.fashion_mnist_dir, when set, comes first) and the image's name (register's
    lineage). Env, not inputs: neither changes what a step computes."""
    return {"FASHION_MNIST_DIR": raw_fashion_mnist(params), "MOFE_IMAGE": settings.image}


def on_cluster(task: dsl.PipelineTask, settings: Kfp, env: dict[str, str], gpu_count: int = 0) -> dsl.PipelineTask:
    """Image, resources, retries, caching, secrets and GPUs of `task` (its pod, by component name).

    `gpu_count`: the step's `<stage>.gpus`, a literal limit (backends before 2.4.0 read no
    other); 0: the pod asks for no GPU and schedules on a cluster without GPU nodes. Features
    of backends newer than `kfp.backend` stay out (backends.allows).
    """
    pod = pods()[task.component_spec.name.replace("_", "-")]
    task.set_container_image(settings.image)
    task.set_cpu_request(f"{pod.cpu:g}").set_memory_request(pod.memory).set_memory_limit(pod.memory)
    # torch in a container sees every core of the node, not the pod's share of them.
    for key, value in {**env, "OMP_NUM_THREADS": str(max(1, int(pod.cpu)))}.items():
        task.set_env_variable(key, value)
    # The run's id for register's lineage: every backend from 2.2.0 labels each pod with it
    # (v2_template.go SetPodMetadataLabels); {{$.pipeline_job_uuid}} needs 2.5.0.
    kubernetes.use_field_path_as_env(task, "KFP_RUN_ID", "metadata.labels['pipeline/runid']")
    task.set_caching_options(pod.cache)
    if pod.retries and backends.allows(settings.backend, "retries"):
        task.set_retry(pod.retries, backoff_duration="30s", backoff_factor=2)
    if gpu_count:
        task.set_accelerator_type(GPU_TYPE).set_accelerator_limit(gpu_count)
        for toleration in settings.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)
        for key, value in settings.gpu_node_selector.items():
            kubernetes.add_node_selector(task, key, str(value))
        if backends.allows(settings.backend, "/dev/shm"):
            # NCCL and DataLoader workers share memory through /dev/shm, 64 MiB in a default pod.
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    if pod.data and settings.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=settings.data_pvc, mount_path=settings.data_mount)
    if pod.storage:
        kubernetes.use_secret_as_env(task, SECRET, {k: k for k in SECRET_KEYS})
        kubernetes.use_config_map_as_env(task, CONFIG_MAP, {k: k for k in CONFIG_KEYS})
        if settings.mlflow_auth_secret:
            kubernetes.use_secret_as_env(task, settings.mlflow_auth_secret, {k: k for k in MLFLOW_AUTH_KEYS})
    backends.older_form(task.platform_config.get("kubernetes", {}))
    return task


def in_docker(task: dsl.PipelineTask, settings: Kfp, env: dict[str, str]) -> dsl.PipelineTask:
    """A step of a local DockerRunner run: the image, and this shell's S3 / MLflow settings as env.

    The values go to the local container only (nothing is compiled); no hub is reached.
    """
    pod = pods()[task.component_spec.name.replace("_", "-")]
    task.set_container_image(settings.image)
    for key, value in {**env, "HF_HUB_OFFLINE": "1"}.items():
        task.set_env_variable(key, value)
    if pod.storage:
        for key in (*SECRET_KEYS, *CONFIG_KEYS, *MLFLOW_AUTH_KEYS):
            if os.environ.get(key):
                task.set_env_variable(key, os.environ[key])
    return task


def component(stage: stages.Stage):
    """The KFP component of `stage` (components/<name>.py)."""
    module, _, name = stage.component.partition(":")
    return getattr(importlib.import_module(module), name)


def call(component, available: dict, what: str) -> dsl.PipelineTask:
    """`component` called with each of its inputs taken by name from `available` (sections,
    earlier steps' artifacts): the pipeline wires outputs to inputs by name."""
    args = {}
    for name, spec in (component.component_spec.inputs or {}).items():
        if name in available:
            args[name] = available[name]
        elif spec.default is None and not spec.optional:
            raise TypeError(f"{what}: no section or earlier step's output is named {name!r} "
                             f"(available: {', '.join(sorted(available))})")
    return component(**args)


def pipeline_signature(defaults: dict) -> inspect.Signature:
    """The pipeline's parameters: one JSON text per params section (and per `section__key`)."""
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                                                annotation=str) for name, value in defaults.items()])


def build(params: dict, until: str | None = None, runner: str = "cluster", image: str | None = None):
    """The pipeline function, its parameters defaulting to `params`; stages after `until` (default:
    none) left out.

    The steps are the stage table's (mofe_ood.stages), in its order, after `validate`; each
    takes its inputs by name from the sections, the GPU counts and the outputs of the steps
    before it. `runner`: cluster (on_cluster's settings), subprocess (bare tasks: a local
    failure is no lost node to retry, and the pods' thread counts would oversubscribe this
    machine) or docker (in_docker's settings).
    """
    from mofe_ood import validate

    validate.run(params)  # a bad param fails here, before anything is compiled or run
    defaults = arguments(params)
    settings = cluster_settings(params, image) if runner != "subprocess" else None
    env = pod_env(params, settings) if settings else {}
    if runner == "docker":  # a local run has no pod label to read its id from (on_cluster)
        env["KFP_RUN_ID"] = os.environ.get("KFP_RUN_ID", "")
    names = stages.names()
    steps = stages.STAGES[:names.index(until or names[-1]) + 1]
    counts = gpus(params)

    def pod(task: dsl.PipelineTask, stage: str = "") -> dsl.PipelineTask:
        if runner == "cluster":
            return on_cluster(task, settings, env, counts.get(stage, 0))
        return in_docker(task, settings, env) if runner == "docker" else task

    def mofe_ood(*values):
        available = {**dict(zip(defaults, values)), "reference": json.dumps(params, sort_keys=True)}
        checked = pod(call(validate_params, available, "validate"))
        produced: set[str] = set()  # artifacts of the steps so far
        for stage in steps:
            if stage.name == "extract" and params["extract"]["shards"] > 1:
                task = sharded_extract(available, pod)
            else:
                task = pod(call(component(stage), available, stage.name), stage.name)
            if not produced & set(component(stage).component_spec.inputs or {}):
                task.after(checked)  # a first step: it waits until the params are known to be good
            if stage.name == "train" and runner == "cluster":  # a hung run must not hold its GPUs forever
                kubernetes.set_timeout(task, settings.train_timeout)
            outputs = task.component_spec.outputs or {}
            available.update({name: task.outputs[name] for name in outputs})
            produced |= set(outputs)

    mofe_ood.__signature__ = pipeline_signature(defaults)
    return dsl.pipeline(mofe_ood, name=NAME, pipeline_root=settings.pipeline_root if settings else None,
                        description="OOD detection with frozen-backbone features and a Mixture of "
                                    "Feature Experts (MoFE, arXiv 2510.10584)")


def sharded_extract(available: dict, pod) -> dsl.PipelineTask:
    """extract.shards > 1: fan out over the shards, fan in (dsl.Collected: KFP backend >= 2.14.0)."""
    shards = pod(call(shard_indices, available, "shard-indices"))
    with dsl.ParallelFor(shards.output) as shard:
        part = pod(call(extract_shard, {**available, "shard": shard}, "extract-shard"), "extract")
    return pod(merge_features(shards=dsl.Collected(part.outputs["features"])))


def arguments(params: dict) -> dict:
    """The run's pipeline arguments, as the file says them: each params section a stage reads as
    JSON text (see components/), and each key a stage reads alone (`Stage.partial`) as
    `section__key`, a copy of that key (the validate step checks that the two agree)."""
    out = {name: json.dumps(params[name], sort_keys=True) for name in stages.sections()}
    for stage in stages.STAGES:
        for read in stage.partial:
            section, key = read.split(".")
            out[f"{section}__{key}"] = json.dumps(params[section][key], sort_keys=True)
    return out


def raw_fashion_mnist(params: dict) -> str:
    """Where a container step reads Fashion-MNIST when prepare.fashion_mnist_dir is null:
    `kfp.fashion_mnist`, default s3://$S3_BUCKET/raw/fashion-mnist (where `mofe push-raw` puts it)."""
    return params["kfp"]["fashion_mnist"] or f"s3://{os.environ.get('S3_BUCKET') or 'mofe-ood'}/raw/fashion-mnist"


def compile_ir(params: dict, out: str | Path, until: str | None = None, image: str | None = None) -> Path:
    compiler.Compiler().compile(build(params, until, "cluster", image), str(out))
    return Path(out)


def run_locally(params: dict, root: str | Path, until: str | None = None, runner: str = "subprocess",
                image: str | None = None) -> dict[str, Path]:
    """Every step as a local subprocess, or in its container; returns the artifacts written, by task/name."""
    from kfp import local

    root = Path(root).resolve()
    before = set(root.glob("*")) if root.is_dir() else set()
    if runner == "docker":
        image = local_image(with_tag(image or cluster_settings(params).image))
        local.init(runner=docker_runner(), pipeline_root=str(root))
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    # The run's id for register's lineage: subprocess steps inherit this env, docker steps get it
    # from build (a cluster's come from the pod label: on_cluster).
    previous = os.environ.get("KFP_RUN_ID")
    os.environ["KFP_RUN_ID"] = f"local-{uuid.uuid4().hex}"
    try:
        with warnings.catch_warnings():
            # The local runner warns that our image name lacks "python": it runs this interpreter.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            build(params, until, runner, image)(**arguments(params))
    finally:
        if previous is None:
            os.environ.pop("KFP_RUN_ID")
        else:
            os.environ["KFP_RUN_ID"] = previous
    (run,) = set(root.glob("*")) - before  # <root>/<pipeline>-<time>/<task>/<output>
    return {str(out.relative_to(run)): out for log in sorted(run.rglob("executor_output.json"))
            for out in sorted(log.parent.iterdir()) if out != log}


def docker_client():
    """The Docker API of $DOCKER_HOST (podman's: infra/image.sh api start), or a clear error."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock (DOCKER_HOST is not set)"
    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:  # docker raises DockerException, requests' and socket errors here
        raise RuntimeError(f"no container API answers at {where} ({type(err).__name__}): start podman's "
                           "with `infra/image.sh api start` and `eval \"$(infra/image.sh api env)\"`, "
                           "or start the Docker daemon") from None
    return client


def local_image(image: str) -> str:
    """The local name of `image` as the API lists it (podman stores `x:t` as `localhost/x:t`)."""
    import docker

    client = docker_client()
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise RuntimeError(f"image {image} is not on this machine: build it with `make image` "
                           "(or name one with --image)") from None
    finally:
        client.close()
    return next((t for t in found.tags if t == image or t.endswith("/" + image)), image)


def docker_runner():
    """kfp's DockerRunner on the host network (S3 and MLflow on loopback), as this user.

    As this user: the runner creates each output folder on the host before the container
    starts; the image's own user could not write there. kfp 2.17.3 also starts containers
    with auto-remove and reads a vanished container's exit status as 0, so a step that
    failed fast passed: its container is kept until the status is read (below).
    """
    from kfp import local
    from kfp.local import docker_task_handler

    docker_client().close()
    docker_task_handler.run_docker_container = run_container
    return local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}")


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """Run one step's container to its end, stream its log, return its exit status, remove it."""
    container = client.containers.run(image=image, command=command, detach=True, stdout=True,
                                      stderr=True, volumes=volumes, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


def submit(params: dict, host: str, experiment: str, run_name: str | None = None,
           namespace: str | None = None, image: str | None = None, version_check: bool = True) -> str:
    """Compile, then upload and run on the KFP endpoint (kfpipe/server.py); returns the run's id."""
    settings = cluster_settings(params, image)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_ir(params, Path(tmp) / "pipeline.yaml", image=settings.image)
        return server.submit(package, arguments(params), image_tag(), host, experiment, run_name, namespace,
                             version_check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = {name: commands.add_parser(name, help=text) for name, text in (
        ("compile", "write the pipeline IR (YAML)"),
        ("run", "run the pipeline on this machine (kfp.local, one subprocess per step)"),
        ("submit", "start a run on a Kubeflow Pipelines endpoint"))}
    for p in sub.values():
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a param (repeatable)")
    sub["compile"].add_argument("--out", default="pipeline.yaml")
    sub["run"].add_argument("--root", default="kfp_local", help="local pipeline root (default: kfp_local)")
    sub["run"].add_argument("--until", choices=stages.names(),
                            help="last stage to run (default: all)")
    sub["run"].add_argument("--runner", choices=RUNNERS, default="subprocess",
                            help="subprocess (default: this Python, no image) or docker (every step in "
                                 "the image, kfp's DockerRunner at $DOCKER_HOST)")
    for name in ("run", "compile", "submit"):
        sub[name].add_argument("--image", help="the component image (default: kfp.image, or $MOFE_IMAGE, "
                                                "tagged with the commit when it has no tag)")
    sub["submit"].add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                               help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT)")
    sub["submit"].add_argument("--experiment", default=NAME)
    sub["submit"].add_argument("--run-name")
    sub["submit"].add_argument("--namespace", help="the profile namespace (multi-user Kubeflow)")
    sub["submit"].add_argument("--no-version-check", action="store_true",
                               help="skip the check of the server's KFP version against what the IR needs")
    args = parser.parse_args(argv)

    try:
        params = merged(load(args.params), parse_set(args.set))
    except ParamError as err:
        parser.error(str(err))
    if args.command == "submit" and not args.host:
        parser.error("submit: --host (or $KF_PIPELINES_ENDPOINT) is required")
    try:
        if args.command == "compile":
            print(compile_ir(params, args.out, image=args.image))
        elif args.command == "run":
            outputs = run_locally(params, args.root, args.until, args.runner, args.image)
            print(json.dumps({name: str(path) for name, path in outputs.items()}, indent=2))
        else:
            print(submit(params, args.host, args.experiment, args.run_name, args.namespace, args.image,
                         version_check=not args.no_version_check))
    except USER_ERRORS as err:  # bad input: params, image tag, server version
        print(f"pipeline.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a failed step (its log is above) or no container API / image
        print(f"pipeline.py {args.command}: error: {re.sub(ANSI, '', str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
