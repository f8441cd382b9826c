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
sections, pods); each step takes its inputs by name from the params sections and the
outputs of the steps before it, so a new stage needs no change here. How each step runs
(its pod, or its local container) is kfpipe/pods.py; local runs kfpipe/local.py; the
server side of submit (version check, versions, namespaces) kfpipe/server.py.
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
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.extract import extract_shard, merge_features, shard_indices
from components.validate import validate as validate_params
from kfpipe import local, pods, server
from mofe_ood import stages
from mofe_ood.cli import USER_ERRORS, parse_set
from mofe_ood.params import ParamError, load, merged

ROOT = Path(__file__).resolve().parent
NAME = server.NAME
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
RUNNERS = ("subprocess", "docker")


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
    before it. `runner`: cluster (kfpipe.pods.on_cluster), subprocess (bare tasks: a local
    failure is no lost node to retry, and the pods' thread counts would oversubscribe this
    machine) or docker (kfpipe.pods.in_docker).
    """
    from mofe_ood import validate

    validate.run(params)  # a bad param fails here, before anything is compiled or run
    defaults = arguments(params)
    settings = pods.cluster_settings(params, image) if runner != "subprocess" else None
    env = pods.pod_env(params, settings) if settings else {}
    names = stages.names()
    steps = stages.STAGES[:names.index(until or names[-1]) + 1]
    counts = pods.gpus(params)

    def pod(task: dsl.PipelineTask, stage: str = "") -> dsl.PipelineTask:
        if runner == "cluster":
            return pods.on_cluster(task, settings, env, counts.get(stage, 0))
        if runner == "docker":  # no pod label to read the run's id from: kfpipe.local.run's
            return pods.in_docker(task, settings, {**env, "KFP_RUN_ID": os.environ.get("KFP_RUN_ID", "")})
        return task

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


def compile_ir(params: dict, out: str | Path, until: str | None = None, image: str | None = None) -> Path:
    compiler.Compiler().compile(build(params, until, "cluster", image), str(out))
    return Path(out)


def run_locally(params: dict, root: str | Path, until: str | None = None, runner: str = "subprocess",
                image: str | None = None) -> dict[str, Path]:
    """Every step as a local subprocess, or in its container; returns the artifacts written, by task/name."""
    if runner == "docker":
        image = local.local_image(pods.with_tag(image or pods.cluster_settings(params).image))
    return local.run(build(params, until, runner, image), arguments(params), root, runner)


def submit(params: dict, host: str, experiment: str, run_name: str | None = None,
           namespace: str | None = None, image: str | None = None, version_check: bool = True,
           image_check: bool = True) -> str:
    """Compile, then upload and run on the KFP endpoint (kfpipe/server.py); returns the run's id."""
    settings = pods.cluster_settings(params, image)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_ir(params, Path(tmp) / "pipeline.yaml", image=settings.image)
        return server.submit(package, arguments(params), pods.image_tag(), settings.image, host, experiment,
                             run_name, namespace, version_check, image_check)


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
    sub["submit"].add_argument("--no-image-check", action="store_true",
                               help="skip the check that the image's tag is in its registry")
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
                         version_check=not args.no_version_check, image_check=not args.no_image_check))
    except USER_ERRORS as err:  # bad input: params, image tag, server version
        print(f"pipeline.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a failed step (its log is above) or no container API / image
        print(f"pipeline.py {args.command}: error: {re.sub(ANSI, '', str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
