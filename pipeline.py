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

The pipeline function (build) wires its tasks explicitly, one line per stage as
kubeflow/pipelines' samples do: each task takes its stage's params sections (the stage table,
mofe_ood/stages.py, says which; tests/test_pipeline.py checks the IR against it) and the
artifacts of the tasks before it. How each step runs (its pod, or its local container) is
kfpipe/pods.py; local runs kfpipe/local.py; the server side of submit (version check,
versions, namespaces) kfpipe/server.py. `validate` checks every section at once (mofe
validate) and fails the run in seconds; compile, run and submit run the same check here first.

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
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from google.protobuf import json_format
from kfp import compiler, dsl, kubernetes

from components.evaluate import evaluate as evaluate_op
from components.extract import extract as extract_op
from components.extract import extract_shard, merge_features, shard_indices
from components.prepare import prepare as prepare_op
from components.register import register as register_op
from components.train import train as train_op
from components.validate import validate as validate_op
from kfpipe import local, pods, server
from mofe_ood import stages
from mofe_ood.cli import USER_ERRORS, parse_set
from mofe_ood.params import ParamError, load, merged

ROOT = Path(__file__).resolve().parent
NAME = server.NAME
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
RUNNERS = ("subprocess", "docker")


def build(params: dict, until: str | None = None, runner: str = "cluster", image: str | None = None):
    """The pipeline function, its parameters defaulting to `params`; stages after `until` (default:
    none) left out.

    `runner`: cluster (kfpipe.pods.on_cluster), subprocess (bare tasks: a local failure is no
    lost node to retry, and the pods' thread counts would oversubscribe this machine) or docker
    (kfpipe.pods.in_docker).
    """
    from mofe_ood import validate

    validate.run(params)  # a bad param fails here, before anything is compiled or run
    if until is not None:
        stages.get(until)  # a ParamError naming the stages
    defaults = arguments(params)
    settings = pods.cluster_settings(params, image) if runner != "subprocess" else None
    if settings:  # a container step (a pod, or the image here) writes checkpoints to the data PVC only
        pods.check_checkpoints(params, settings)
    env = pods.pod_env(params, settings) if settings else {}
    counts = pods.gpus(params)
    reference = json.dumps(params, sort_keys=True)  # what validate compares a run's arguments with
    sharded = params["extract"]["shards"] > 1

    def pod(task: dsl.PipelineTask, stage: str = "") -> dsl.PipelineTask:
        """`task` as `runner` runs it; `stage`: whose `<stage>.gpus` it gets."""
        if runner == "cluster":
            return pods.on_cluster(task, settings, env, counts.get(stage, 0))
        if runner == "docker":  # no pod label to read the run's id from: kfpipe.local.run's
            return pods.in_docker(task, settings, {**env, "KFP_RUN_ID": os.environ.get("KFP_RUN_ID", "")})
        return task

    # One parameter per params section a stage reads (JSON text), and per key read alone
    # (`section__key`); each task takes the sections of its stage (the stage table's), and the
    # artifacts of the tasks before it. wiring_problems (below) holds the function to the table.
    @dsl.pipeline(name=NAME, pipeline_root=settings.pipeline_root if settings else None,
                  description="OOD detection with frozen-backbone features and a Mixture of "
                              "Feature Experts (MoFE, arXiv 2510.10584)")
    def mofe_ood(base: str = defaults["base"], prepare: str = defaults["prepare"],
                 extract: str = defaults["extract"], train: str = defaults["train"],
                 finetune: str = defaults["finetune"], evaluate: str = defaults["evaluate"],
                 register: str = defaults["register"], serve: str = defaults["serve"],
                 evaluate__extra_ood: str = defaults["evaluate__extra_ood"]):
        checked = pod(validate_op(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                                  evaluate=evaluate, register=register, serve=serve,
                                  evaluate__extra_ood=evaluate__extra_ood, reference=reference))

        prepared = pod(prepare_op(base=base, prepare=prepare, evaluate__extra_ood=evaluate__extra_ood), "prepare")
        prepared.after(checked)  # the first stage waits until the params are known to be good
        if until == "prepare":
            return

        if sharded:
            features = sharded_extract(base, extract, prepared.outputs["prepared"], pod)
        else:
            features = pod(extract_op(base=base, extract=extract, prepared=prepared.outputs["prepared"]), "extract")
        if until == "extract":
            return

        models = pod(train_op(base=base, extract=extract, train=train, finetune=finetune,
                              prepared=prepared.outputs["prepared"], features=features.outputs["features"]), "train")
        if runner == "cluster":  # a hung run must not hold its GPUs forever
            kubernetes.set_timeout(models, settings.train_timeout)
        if until == "train":
            return

        reports = pod(evaluate_op(base=base, train=train, finetune=finetune, evaluate=evaluate, register=register,
                                  features=features.outputs["features"], models=models.outputs["models"]),
                      "evaluate")
        if until == "evaluate":
            return

        pod(register_op(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                        evaluate=evaluate, register=register, serve=serve, features=features.outputs["features"],
                        models=models.outputs["models"], reports=reports.outputs["reports"]), "register")

    problems = wiring_problems(json_format.MessageToDict(mofe_ood.pipeline_spec), until, sharded)
    if problems:  # a stage added to the table, not to the function above (CONTRIBUTING.md's recipe)
        raise TypeError("pipeline.py: the pipeline function disagrees with the stage table "
                        "(mofe_ood/stages.py): " + "; ".join(problems))
    return mofe_ood


# Tasks of the pipeline that are no stage: the params check, and extract's fan-out and fan-in.
HELPER_TASKS = re.compile(r"validate|shard-indices|merge-features|for-loop-\d+")


def stage_inputs(stage: stages.Stage) -> set[str]:
    """The parameter inputs of `stage`'s task: its sections, `section__key` for a key read alone."""
    partial = {read.split(".")[0] for read in stage.partial}
    return {*(set(stage.sections) - partial), *(read.replace(".", "__") for read in stage.partial)}


def wiring_problems(spec: dict, until: str | None = None, sharded: bool = False) -> list[str]:
    """Where the compiled pipeline (`spec`: its PipelineSpec as a dict) and the stage table
    disagree: a stage up to `until` with no task, a task of no stage, a task whose parameters
    are not its stage's sections, each from the pipeline parameter of the same name."""
    names = stages.names()
    expected = names[:names.index(until) + 1] if until else names
    tasks = spec["root"]["dag"]["tasks"]
    problems = [f"task {name!r} is no stage of the table (or comes after --until {until})"
                for name in tasks if name not in expected and not HELPER_TASKS.fullmatch(name)]
    for stage in stages.STAGES:
        if stage.name not in expected or (stage.name == "extract" and sharded):  # sharded: its own tasks
            continue
        if stage.name not in tasks:
            problems.append(f"stage {stage.name!r} has no task in the pipeline function")
            continue
        given = {key: value.get("componentInputParameter")
                 for key, value in tasks[stage.name].get("inputs", {}).get("parameters", {}).items()}
        if given != {name: name for name in stage_inputs(stage)}:
            problems.append(f"task {stage.name!r} takes {given}, but its stage reads "
                            f"{sorted(stage_inputs(stage))} (each from the pipeline parameter of its name)")
    return problems


def sharded_extract(base, extract, prepared, pod) -> dsl.PipelineTask:
    """extract.shards > 1: fan out over the shards, fan in (dsl.Collected: KFP backend >= 2.14.0)."""
    shards = pod(shard_indices(extract=extract))
    with dsl.ParallelFor(shards.output) as shard:
        part = pod(extract_shard(base=base, extract=extract, prepared=prepared, shard=shard), "extract")
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
    volumes = {}
    if runner == "docker":
        settings = pods.cluster_settings(params, image)
        image, volumes = local.local_image(settings.image), pods.local_volumes(settings)
    return local.run(lambda: build(params, until, runner, image), arguments(params), root, runner, volumes)


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
