"""The MoFE OOD pipeline on Kubeflow: the stages of dvc.yaml as containerized steps.

    python pipeline.py compile [--out pipeline.yaml]             # the IR to upload to a cluster
    python pipeline.py run [--runner docker] [--image IMAGE]      # the whole pipeline here
    python pipeline.py submit --host URL [--experiment NAME]     # a run on a KFP endpoint

    validate -> prepare -> extract -> train -> evaluate -> register           (extract.shards: 1, any KFP 2.x)
    validate -> prepare -> extract x N (ParallelFor) -> merge_features -> ...  (extract.shards: N > 1)

`validate` checks every section at once (mofe validate) and fails the run in seconds;
compile, run and submit run the same check here first.

Each params.yaml section (base, prepare, ...) is one pipeline parameter, the
section as JSON text, its default the file's value; `--set` changes the values
sent for this run. `extract.gpus` and `train.gpus` are integer parameters of
their own: they feed the steps' accelerator limits. The `kfp` section (image,
pipeline_root, secret, config_map, GPU node settings, data PVC, train timeout) is
read when compiling: it shapes the pods, not the computation. MOFE_IMAGE and
MOFE_PIPELINE_ROOT override `kfp.image` and `kfp.pipeline_root`; an image without
a tag gets the checkout's (infra/image.sh tag: the commit), so a new commit is a new
image string and KFP's cache cannot serve old code.

Runners of `run`: `subprocess` (default; every step a process of this Python, no
image) and `docker` (kfp's DockerRunner: every step in the image, through the
Docker API at $DOCKER_HOST, e.g. podman's: infra/image.sh api start). A docker run
reads raw data from S3, as a cluster does (mofe push-raw; see README).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import DEFAULT_IMAGE
from components.evaluate import evaluate as evaluate_variants
from components.extract import extract as extract_all
from components.extract import extract_shard, merge_features, shard_indices
from components.prepare import prepare as prepare_benchmark
from components.register import register as register_models
from components.train import train as train_variants
from components.validate import validate as validate_params
from mofe_ood.cli import parse_set
from mofe_ood.params import ParamError, check_number, load, merged

ROOT = Path(__file__).resolve().parent
NAME = "mofe-ood"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
STAGES = ("prepare", "extract", "train", "evaluate", "register")
SECTIONS = ("base", *STAGES, "finetune")
RUNNERS = ("subprocess", "docker")
# dsl.Collected over artifacts (the fan-in of extract.shards > 1) runs on KFP backends from
# 2.5.0 on (kubeflow/pipelines PR 11725, "enable dsl.Collected for parameters & artifacts").
COLLECTED_MIN_BACKEND = (2, 5, 0)
# The Secret and ConfigMap are infra/k8s's (and must exist in the namespace the runs use).
CLUSTER_DEFAULTS = {"image": DEFAULT_IMAGE, "pipeline_root": "s3://mofe-ood/kfp",
                    "secret": "mofe-ood-s3", "config_map": "mofe-ood-storage",
                    "gpu_type": "nvidia.com/gpu", "gpu_node_selector": {},
                    "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                         "effect": "NoSchedule"}],
                    "data_pvc": None, "data_mount": "/data", "train_timeout": 86400}
# What a step that talks to S3 or MLflow gets as env, each key under its own name. Only
# these names reach the IR, never a value.
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CONFIG_KEYS = ("S3_ENDPOINT_URL", "S3_BUCKET", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
               "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Pod:
    """What one step asks of the cluster."""

    cpu: float               # cores requested; also the threads torch starts (OMP_NUM_THREADS)
    memory: str
    retries: int = 2         # every step is idempotent: it rewrites its own outputs
    cache: bool = False      # KFP reuses a cached output only where inputs fully determine it
    storage: bool = False    # gets SECRET_KEYS and CONFIG_KEYS as env
    data: bool = False       # mounts kfp.data_pvc (image folders read by path) when one is set


PODS = {
    "validate": Pod(0.5, "2Gi", retries=0),  # a bad param stays bad on a retry
    "prepare": Pod(2, "8Gi", cache=True, storage=True, data=True),  # raw data from S3 or the PVC
    "shard-indices": Pod(0.1, "256Mi", cache=True),
    "extract": Pod(4, "16Gi", cache=True, data=True),  # + extract.gpus GPUs
    "extract-shard": Pod(4, "16Gi", cache=True, data=True),
    "merge-features": Pod(1, "8Gi", cache=True),
    "train": Pod(4, "32Gi", retries=1, data=True),  # + train.gpus GPUs; fine-tuning reads images
    "evaluate": Pod(4, "16Gi"),
    "register": Pod(1, "4Gi", storage=True),  # same content again = same model version
}


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


def cluster_settings(params: dict, image: str | None = None) -> dict:
    settings = {**CLUSTER_DEFAULTS, **(params.get("kfp") or {})}
    env = {"image": "MOFE_IMAGE", "pipeline_root": "MOFE_PIPELINE_ROOT"}
    settings.update({key: os.environ[var] for key, var in env.items() if os.environ.get(var)})
    settings["image"] = with_tag(image or settings["image"])
    check_number("kfp.train_timeout", settings["train_timeout"], low=1, integer=True)
    if not isinstance(settings["gpu_node_selector"], dict):
        raise ParamError(f"kfp.gpu_node_selector: {settings['gpu_node_selector']!r} must be a mapping")
    if not isinstance(settings["gpu_tolerations"], list):
        raise ParamError(f"kfp.gpu_tolerations: {settings['gpu_tolerations']!r} must be a list of "
                         "{key, operator, value, effect}")
    return settings


def gpus(params: dict) -> dict[str, int]:
    """`extract.gpus`, `train.gpus`: the GPUs each step asks for (0: none, the default)."""
    return {stage: check_number(f"{stage}.gpus", (params.get(stage) or {}).get("gpus", 0), low=0, integer=True)
            for stage in ("extract", "train")}


def on_cluster(task: dsl.PipelineTask, settings: dict, gpu_count=None, compiled_gpus: int = 0) -> dsl.PipelineTask:
    """Image, resources, retries, caching, secrets and GPUs of `task` (from PODS, by component name).

    `gpu_count`: the pipeline parameter feeding the accelerator limit, wired only when the
    params asked for GPUs at compile time (`compiled_gpus` > 0): a pod of a default run asks
    for no GPU and schedules on a cluster without GPU nodes.
    """
    pod = PODS[task.component_spec.name.replace("_", "-")]
    task.set_container_image(settings["image"])
    task.set_cpu_request(f"{pod.cpu:g}").set_memory_request(pod.memory).set_memory_limit(pod.memory)
    # torch in a container sees every core of the node, not the pod's share of them.
    task.set_env_variable("OMP_NUM_THREADS", str(max(1, int(pod.cpu))))
    task.set_caching_options(pod.cache)
    if pod.retries:
        task.set_retry(pod.retries, backoff_duration="30s", backoff_factor=2)
    if compiled_gpus:
        task.set_accelerator_type(settings["gpu_type"]).set_accelerator_limit(gpu_count)
        for toleration in settings["gpu_tolerations"]:
            kubernetes.add_toleration(task, **toleration)
        for key, value in settings["gpu_node_selector"].items():
            kubernetes.add_node_selector(task, key, str(value))
        # NCCL and DataLoader workers share memory through /dev/shm, 64 MiB in a default pod.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    if pod.data and settings["data_pvc"]:
        kubernetes.mount_pvc(task, pvc_name=settings["data_pvc"], mount_path=settings["data_mount"])
    if pod.storage:
        kubernetes.use_secret_as_env(task, settings["secret"], {k: k for k in SECRET_KEYS})
        kubernetes.use_config_map_as_env(task, settings["config_map"], {k: k for k in CONFIG_KEYS})
    return task


def in_docker(task: dsl.PipelineTask, settings: dict) -> dsl.PipelineTask:
    """A step of a local DockerRunner run: the image, and this shell's S3 / MLflow settings as env.

    The values go to the local container only (nothing is compiled); no hub is reached.
    """
    pod = PODS[task.component_spec.name.replace("_", "-")]
    task.set_container_image(settings["image"])
    task.set_env_variable("HF_HUB_OFFLINE", "1")
    if pod.storage:
        for key in (*SECRET_KEYS, *CONFIG_KEYS):
            if os.environ.get(key):
                task.set_env_variable(key, os.environ[key])
    return task


def build(params: dict, until: str = "register", runner: str = "cluster", image: str | None = None):
    """The pipeline function, its parameters defaulting to `params`; stages after `until` left out.

    `runner`: cluster (on_cluster's settings), subprocess (bare tasks: a local failure is no
    lost node to retry, and the pods' thread counts would oversubscribe this machine) or
    docker (in_docker's settings).
    """
    from mofe_ood import validate

    validate.run(params)  # a bad param fails here, before anything is compiled or run
    defaults = arguments(params, runner)
    settings = cluster_settings(params, image) if runner != "subprocess" else {}
    sharded = int(json.loads(defaults["extract"]).get("shards", 1)) > 1
    stages = STAGES[:STAGES.index(until) + 1]
    compiled = gpus(params)

    def pod(task: dsl.PipelineTask, gpu_count=None, stage: str = "") -> dsl.PipelineTask:
        if runner == "cluster":
            return on_cluster(task, settings, gpu_count, compiled.get(stage, 0))
        return in_docker(task, settings) if runner == "docker" else task

    @dsl.pipeline(name=NAME, pipeline_root=settings.get("pipeline_root"),
                  description="OOD detection with frozen-backbone features and a Mixture of "
                              "Feature Experts (MoFE, arXiv 2510.10584)")
    def mofe_ood(base: str = defaults["base"], prepare: str = defaults["prepare"],
                 extract: str = defaults["extract"], train: str = defaults["train"],
                 evaluate: str = defaults["evaluate"], register: str = defaults["register"],
                 finetune: str = defaults["finetune"], extract_gpus: int = defaults["extract_gpus"],
                 train_gpus: int = defaults["train_gpus"]):
        checked = pod(validate_params(base=base, prepare=prepare, extract=extract, train=train,
                                      finetune=finetune, evaluate=evaluate, register=register,
                                      extract_gpus=extract_gpus, train_gpus=train_gpus,
                                      reference=json.dumps(params, sort_keys=True)))
        prepared = pod(prepare_benchmark(base=base, prepare=prepare, evaluate=evaluate).after(checked))
        prepared = prepared.outputs["prepared"]
        if sharded:  # fan-out / fan-in: needs a backend with dsl.Collected (COLLECTED_MIN_BACKEND)
            shards = pod(shard_indices(extract=extract))
            with dsl.ParallelFor(shards.output) as shard:
                part = pod(extract_shard(base=base, extract=extract, gpus=extract_gpus, shard=shard,
                                         prepared=prepared), extract_gpus, "extract")
            features = pod(merge_features(shards=dsl.Collected(part.outputs["features"])))
        else:  # a plain DAG: any KFP 2.x backend
            features = pod(extract_all(base=base, extract=extract, gpus=extract_gpus, prepared=prepared),
                           extract_gpus, "extract")
        features = features.outputs["features"]
        if "train" in stages:
            trained = pod(train_variants(base=base, extract=extract, train=train, finetune=finetune,
                                         gpus=train_gpus, prepared=prepared, features=features),
                          train_gpus, "train")
            if runner == "cluster":  # a hung fine-tuning run must not hold its GPUs forever
                kubernetes.set_timeout(trained, settings["train_timeout"])
            models = trained.outputs["models"]
        if "evaluate" in stages:
            reports = pod(evaluate_variants(base=base, train=train, finetune=finetune, evaluate=evaluate,
                                            register=register, features=features,
                                            models=models)).outputs["reports"]
        if "register" in stages:
            pod(register_models(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                                evaluate=evaluate, register=register, features=features,
                                models=models, reports=reports, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                image=settings.get("image", "")))

    return mofe_ood


def arguments(params: dict, runner: str = "subprocess") -> dict:
    """The run's pipeline arguments: each params.yaml section as JSON text (see components/),
    and `extract_gpus` / `train_gpus` as integers (taken out of their sections: one place each).

    A container has no host folder: unless prepare.fashion_mnist_dir names one, its steps
    read Fashion-MNIST from S3 (`kfp.fashion_mnist`, default s3://$S3_BUCKET/raw/fashion-mnist,
    where `mofe push-raw` puts it).
    """
    sections = {name: dict(params.get(name) or {}) for name in SECTIONS}
    counts = gpus(params)
    for stage in counts:
        sections[stage].pop("gpus", None)
    if runner != "subprocess" and not sections["prepare"].get("fashion_mnist_dir"):
        sections["prepare"]["fashion_mnist_dir"] = raw_fashion_mnist(params)
    out: dict = {name: json.dumps(value, sort_keys=True) for name, value in sections.items()}
    out.update(extract_gpus=counts["extract"], train_gpus=counts["train"])
    return out


def raw_fashion_mnist(params: dict) -> str:
    return ((params.get("kfp") or {}).get("fashion_mnist")
            or f"s3://{os.environ.get('S3_BUCKET') or 'mofe-ood'}/raw/fashion-mnist")


def compile_ir(params: dict, out: str | Path, until: str = "register", image: str | None = None) -> Path:
    compiler.Compiler().compile(build(params, until, "cluster", image), str(out))
    return Path(out)


def run_locally(params: dict, root: str | Path, until: str = "register", runner: str = "subprocess",
                image: str | None = None) -> dict[str, Path]:
    """Every step as a local subprocess, or in its container; returns the artifacts written, by task/name."""
    from kfp import local

    root = Path(root).resolve()
    before = set(root.glob("*")) if root.is_dir() else set()
    if runner == "docker":
        image = local_image(with_tag(image or cluster_settings(params)["image"]))
        local.init(runner=docker_runner(), pipeline_root=str(root))
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    with warnings.catch_warnings():
        # The local runner warns that our image name lacks "python": it runs this interpreter.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        build(params, until, runner, image)(**arguments(params, runner))
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


def backend_version(host: str, token: str | None) -> tuple[int, ...] | None:
    """The KFP server's version from its healthz (`tag_name`, e.g. 2.14.3), or None if it says none."""
    for path in ("/apis/v1beta1/healthz", "/apis/v2beta1/healthz"):
        request = urllib.request.Request(host.rstrip("/") + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                tag = json.load(response).get("tag_name") or ""
        except (OSError, ValueError):
            continue
        numbers = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", tag)
        if numbers:
            return tuple(int(n or 0) for n in numbers.groups())
    return None


def check_backend(host: str, token: str | None) -> None:
    """Fail before anything is uploaded if the server cannot run the sharded (Collected) DAG."""
    need = ".".join(map(str, COLLECTED_MIN_BACKEND))
    found = backend_version(host, token)
    fix = "set extract.shards: 1 (a plain DAG that runs on any KFP 2.x)"
    if found is None:
        raise ParamError(f"extract.shards > 1 needs a Kubeflow Pipelines backend >= {need} (dsl.Collected); "
                         f"the server at {host} does not report its version: {fix}, or pass "
                         "--no-version-check if you know it is recent enough")
    if found < COLLECTED_MIN_BACKEND:
        raise ParamError(f"extract.shards > 1 needs a Kubeflow Pipelines backend >= {need} (dsl.Collected); "
                         f"the server at {host} runs {'.'.join(map(str, found))}: {fix}, or upgrade it")


def submit(params: dict, host: str, experiment: str, run_name: str | None = None,
           namespace: str | None = None, image: str | None = None, version_check: bool = True) -> str:
    """Upload the pipeline and a version named by the commit, then start a run of it; returns its id.

    A bearer token comes from $KF_PIPELINES_TOKEN.
    """
    from kfp import Client

    token = os.environ.get("KF_PIPELINES_TOKEN") or None
    settings = cluster_settings(params, image)
    if version_check and int((params.get("extract") or {}).get("shards", 1)) > 1:
        check_backend(host, token)
    client = Client(host=host, existing_token=token)
    tag = settings["image"].rsplit(":", 1)[-1]
    version_name = f"{NAME}-{tag}"
    with tempfile.TemporaryDirectory() as tmp:
        package = str(compile_ir(params, Path(tmp) / "pipeline.yaml", image=settings["image"]))
        pipeline_id = client.get_pipeline_id(NAME)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(package, NAME, namespace=namespace).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, page_size=100,
                                                 filter=json.dumps({"predicates": [{
                                                     "key": "display_name", "operation": "EQUALS",
                                                     "string_value": version_name}]}))
        found = [v for v in (versions.pipeline_versions or []) if v.display_name == version_name]
        if found and not tag.endswith("-dirty"):  # the same commit: the same pipeline
            version_id = found[0].pipeline_version_id
        else:
            if found:  # a dirty tree changes without a new commit: one version per upload
                version_name += "-" + str(len(versions.pipeline_versions or []))
            version_id = client.upload_pipeline_version(package, version_name,
                                                        pipeline_id=pipeline_id).pipeline_version_id
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    result = client.run_pipeline(experiment_id=experiment_id, job_name=run_name or version_name,
                                 params=arguments(params, "cluster"), pipeline_id=pipeline_id,
                                 version_id=version_id)
    return result.run_id


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
    sub["run"].add_argument("--until", choices=STAGES, default="register",
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
                               help="skip the server version check of a sharded (extract.shards > 1) run")
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
    except ParamError as err:  # bad input: params, image tag, server version
        print(f"pipeline.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a failed step (its log is above) or no container API / image
        print(f"pipeline.py {args.command}: error: {re.sub(ANSI, '', str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
