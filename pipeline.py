"""The MoFE OOD pipeline on Kubeflow: the stages of dvc.yaml as containerized steps.

    python pipeline.py compile [--out pipeline.yaml]           # the IR to upload to a cluster
    python pipeline.py run [--params F] [--set S.K=V ...]       # the whole pipeline here, no Docker
    python pipeline.py submit --host URL [--experiment NAME]   # a run on a KFP endpoint

    prepare -> extract (x extract.shards, ParallelFor) -> merge_features -> train -> evaluate -> register

Each params.yaml section (base, prepare, ...) is one pipeline parameter, the
section as JSON text, its default the file's value; `--set` changes the values
sent for this run. The optional `kfp` section (image, pipeline_root, secret,
config_map) and `train.gpus` are read when compiling: they shape the pods, not
the computation. MOFE_IMAGE and MOFE_PIPELINE_ROOT override `kfp.image` and
`kfp.pipeline_root`.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import DEFAULT_IMAGE
from components.evaluate import evaluate as evaluate_variants
from components.extract import extract as extract_shard
from components.extract import merge_features, shard_indices
from components.prepare import prepare as prepare_benchmark
from components.register import register as register_models
from components.train import train as train_variants
from mofe_ood.cli import parse_set
from mofe_ood.params import ParamError, check_number, load, merged

NAME = "mofe-ood"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
STAGES = ("prepare", "extract", "train", "evaluate", "register")
SECTIONS = ("base", *STAGES, "finetune")
# The Secret and ConfigMap are infra/k8s's (and must exist in the namespace the runs use).
CLUSTER_DEFAULTS = {"image": DEFAULT_IMAGE, "pipeline_root": "s3://mofe-ood/kfp",
                    "secret": "mofe-ood-s3", "config_map": "mofe-ood-storage"}
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


PODS = {
    "prepare": Pod(2, "8Gi", cache=True),
    "shard-indices": Pod(0.1, "256Mi", cache=True),
    "extract": Pod(4, "16Gi", cache=True),
    "merge-features": Pod(1, "8Gi", cache=True),
    "train": Pod(4, "32Gi", retries=1),  # + train.gpus NVIDIA GPUs
    "evaluate": Pod(4, "16Gi"),
    "register": Pod(1, "4Gi", storage=True),  # same content again = same model version
}


def cluster_settings(params: dict) -> dict:
    settings = {**CLUSTER_DEFAULTS, **(params.get("kfp") or {})}
    env = {"image": "MOFE_IMAGE", "pipeline_root": "MOFE_PIPELINE_ROOT"}
    settings.update({key: os.environ[var] for key, var in env.items() if os.environ.get(var)})
    settings["train_gpus"] = check_number("train.gpus", (params.get("train") or {}).get("gpus", 1),
                                          low=0, integer=True)
    return settings


def on_cluster(task: dsl.PipelineTask, settings: dict, gpus: int = 0) -> dsl.PipelineTask:
    """Image, resources, retries, caching and secrets of `task` (from PODS, by component name)."""
    pod = PODS[task.component_spec.name.replace("_", "-")]
    task.set_container_image(settings["image"])
    task.set_cpu_request(f"{pod.cpu:g}").set_memory_request(pod.memory).set_memory_limit(pod.memory)
    # torch in a container sees every core of the node, not the pod's share of them.
    task.set_env_variable("OMP_NUM_THREADS", str(max(1, int(pod.cpu))))
    task.set_caching_options(pod.cache)
    if pod.retries:
        task.set_retry(pod.retries, backoff_duration="30s", backoff_factor=2)
    if gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if pod.storage:
        kubernetes.use_secret_as_env(task, settings["secret"], {k: k for k in SECRET_KEYS})
        kubernetes.use_config_map_as_env(task, settings["config_map"], {k: k for k in CONFIG_KEYS})
    return task


def build(params: dict, until: str = "register", local: bool = False):
    """The pipeline function, its parameters defaulting to `params`; stages after `until` left out.

    `local`: the bare tasks, without on_cluster's settings (a local failure is no lost node to
    retry, and the pods' thread counts would oversubscribe this machine).
    """
    defaults = arguments(params)
    settings = cluster_settings(params)
    stages = STAGES[:STAGES.index(until) + 1]

    def pod(task: dsl.PipelineTask, gpus: int = 0) -> dsl.PipelineTask:
        return task if local else on_cluster(task, settings, gpus)

    @dsl.pipeline(name=NAME, pipeline_root=settings["pipeline_root"],
                  description="OOD detection with frozen-backbone features and a Mixture of "
                              "Feature Experts (MoFE, arXiv 2510.10584)")
    def mofe_ood(base: str = defaults["base"], prepare: str = defaults["prepare"],
                 extract: str = defaults["extract"], train: str = defaults["train"],
                 evaluate: str = defaults["evaluate"], register: str = defaults["register"],
                 finetune: str = defaults["finetune"]):
        prepared = pod(prepare_benchmark(base=base, prepare=prepare, evaluate=evaluate))
        shards = pod(shard_indices(extract=extract))
        with dsl.ParallelFor(shards.output) as shard:
            part = pod(extract_shard(base=base, extract=extract, shard=shard,
                                     prepared=prepared.outputs["prepared"]))
        features = pod(merge_features(shards=dsl.Collected(part.outputs["features"])))
        features = features.outputs["features"]
        if "train" in stages:
            models = pod(train_variants(base=base, extract=extract, train=train, finetune=finetune,
                                        prepared=prepared.outputs["prepared"], features=features),
                         gpus=settings["train_gpus"]).outputs["models"]
        if "evaluate" in stages:
            reports = pod(evaluate_variants(base=base, train=train, finetune=finetune, evaluate=evaluate,
                                            features=features, models=models)).outputs["reports"]
        if "register" in stages:
            pod(register_models(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                                evaluate=evaluate, register=register, features=features,
                                models=models, reports=reports))

    return mofe_ood


def arguments(params: dict) -> dict:
    """The run's pipeline arguments: each params.yaml section as JSON text (see components/)."""
    return {section: json.dumps(params.get(section) or {}, sort_keys=True) for section in SECTIONS}


def compile_ir(params: dict, out: str | Path, until: str = "register") -> Path:
    compiler.Compiler().compile(build(params, until), str(out))
    return Path(out)


def run_locally(params: dict, root: str | Path, until: str = "register") -> dict[str, Path]:
    """Every step as a local subprocess (no Docker); returns the artifacts written, by task/name."""
    from kfp import local

    root = Path(root).resolve()
    before = set(root.glob("*")) if root.is_dir() else set()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    with warnings.catch_warnings():
        # The local runner warns that our image name lacks "python": it runs this interpreter.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        build(params, until, local=True)(**arguments(params))
    (run,) = set(root.glob("*")) - before  # <root>/<pipeline>-<time>/<task>/<output>
    return {str(out.relative_to(run)): out for log in sorted(run.rglob("executor_output.json"))
            for out in sorted(log.parent.iterdir()) if out != log}


def submit(params: dict, host: str, experiment: str, run_name: str | None = None,
           namespace: str | None = None) -> str:
    """Compile and start a run; returns its id. A bearer token comes from $KF_PIPELINES_TOKEN."""
    from kfp import Client

    client = Client(host=host, existing_token=os.environ.get("KF_PIPELINES_TOKEN") or None)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_ir(params, Path(tmp) / "pipeline.yaml")
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments(params), run_name=run_name,
            experiment_name=experiment, namespace=namespace)
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
    sub["submit"].add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                               help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT)")
    sub["submit"].add_argument("--experiment", default=NAME)
    sub["submit"].add_argument("--run-name")
    sub["submit"].add_argument("--namespace", help="the profile namespace (multi-user Kubeflow)")
    args = parser.parse_args(argv)

    try:
        params = merged(load(args.params), parse_set(args.set))
    except ParamError as err:
        parser.error(str(err))
    if args.command == "compile":
        print(compile_ir(params, args.out))
    elif args.command == "run":
        try:
            outputs = run_locally(params, args.root, args.until)
        except RuntimeError as err:  # a failed step: its log is above
            print(f"pipeline.py run: error: {re.sub(ANSI, '', str(err))}", file=sys.stderr)
            return 1
        print(json.dumps({name: str(path) for name, path in outputs.items()}, indent=2))
    else:
        if not args.host:
            parser.error("submit: --host (or $KF_PIPELINES_ENDPOINT) is required")
        print(submit(params, args.host, args.experiment, args.run_name, args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
