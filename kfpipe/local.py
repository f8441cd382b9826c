"""Whole pipeline runs on this machine: kfp.local's SubprocessRunner (this Python, no image)
or its DockerRunner (every step in the image, through the Docker API at $DOCKER_HOST, e.g.
podman's), with a workaround for a DockerRunner bug (docker_runner)."""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Callable


def run(pipeline: Callable, arguments: dict, root: str | Path, runner: str) -> dict[str, Path]:
    """Run `pipeline` (a @dsl.pipeline function) with `arguments` under the local pipeline root
    `root`; returns the artifacts written, by task/name."""
    from kfp import local

    root = Path(root).resolve()
    before = set(root.glob("*")) if root.is_dir() else set()
    if runner == "docker":
        local.init(runner=docker_runner(), pipeline_root=str(root))
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    # The run's id for register's lineage: subprocess steps inherit this env, docker steps get it
    # from pods.in_docker (a cluster's come from the pod label: pods.on_cluster).
    previous = os.environ.get("KFP_RUN_ID")
    os.environ["KFP_RUN_ID"] = f"local-{uuid.uuid4().hex}"
    try:
        with warnings.catch_warnings():
            # The local runner warns that our image name lacks "python": it runs this interpreter.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            pipeline(**arguments)
    finally:
        if previous is None:
            os.environ.pop("KFP_RUN_ID")
        else:
            os.environ["KFP_RUN_ID"] = previous
    (done,) = set(root.glob("*")) - before  # <root>/<pipeline>-<time>/<task>/<output>
    return {str(out.relative_to(done)): out for log in sorted(done.rglob("executor_output.json"))
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
