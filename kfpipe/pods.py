"""How each step runs: its pod on a cluster (image, resources, env, secrets, GPUs, volumes,
within what `kfp.backend` allows) or its container on this machine (kfp's DockerRunner).
pipeline.py applies these to the tasks it wires; nothing here changes what a step computes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from kfp import dsl, kubernetes

from kfpipe import backends
from mofe_ood import stages
from mofe_ood.params import ParamError
from mofe_ood.stages import Kfp, Resources

ROOT = Path(__file__).resolve().parents[1]
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
    if settings.image_pull_secret:  # a private registry
        kubernetes.set_image_pull_secrets(task, [settings.image_pull_secret])
    if settings.image_pull_policy:
        kubernetes.set_image_pull_policy(task, settings.image_pull_policy)
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


def raw_fashion_mnist(params: dict) -> str:
    """Where a container step reads Fashion-MNIST when prepare.fashion_mnist_dir is null:
    `kfp.fashion_mnist`, default s3://$S3_BUCKET/raw/fashion-mnist (where `mofe push-raw` puts it)."""
    return params["kfp"]["fashion_mnist"] or f"s3://{os.environ.get('S3_BUCKET') or 'mofe-ood'}/raw/fashion-mnist"
