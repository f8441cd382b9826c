"""The IR on the oldest supported KFP backend (2.2.0, Kubeflow 1.9), parsed as its API server
and driver parse it, with the protos it is built with (kfp_backend_2.2.0/, tests/kfp_protos.py);
and the features that need a newer backend (kfpipe/backends.py)."""

import pytest
import yaml
from google.protobuf import json_format

import pipeline
from kfpipe import backends, pods
from mofe_ood import stages
from mofe_ood.params import load, merged
from tests import kfp_protos

ROOT = pipeline.ROOT
IMAGE = "registry.example.org/mofe-ood:test"
# The IRs a user compiles: the defaults, GPUs (picked by a node label), a data PVC, the full preset
# (GPUs, fine-tuning), and sharded extraction.
IRS = {
    "default": {},
    "gpu": {"train": {"gpus": 2}, "extract": {"gpus": 1}, "finetune": {"enabled": True},
            "kfp": {"gpu_node_selector": {"gpu": "h200"}}},
    "pvc": {"kfp": {"data_pvc": "imagenet"}},
    "pull": {"kfp": {"image_pull_secret": "regcred", "image_pull_policy": "Always"}},
    "full": None,  # presets/full.yaml
    "shards": {"extract": {"shards": 4}},
}


def params_of(name: str) -> dict:
    if IRS[name] is None:
        return load(ROOT / "presets" / "full.yaml")
    return merged(load(ROOT / "params.yaml"), IRS[name])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (params, pipeline spec, platform spec, IR text)."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOFE_IMAGE", IMAGE)
        for name in IRS:
            params = params_of(name)
            path = pipeline.compile_ir(params, tmp_path_factory.mktemp("ir") / f"{name}.yaml")
            spec, platform = yaml.safe_load_all(path.read_text())
            out[name] = params, spec, platform
    return out


@pytest.fixture(scope="module")
def old():
    """(PipelineSpec, PlatformSpec, PipelineContainerSpec, KubernetesExecutorConfig) of backend 2.2.0."""
    return kfp_protos.backend_messages("2.2.0")


def kubernetes_configs(platform: dict) -> dict:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_vendored_protos_are_read_as_the_backend_knows_them(old):
    fields = kfp_protos.declared((kfp_protos.HERE / "kfp_backend_2.2.0" / "kubernetes_executor_config.proto")
                                 .read_text())
    assert fields["SecretAsEnv"] == {"secret_name", "key_to_env"}
    assert fields["PvcMount"] == {"task_output_parameter", "constant", "component_input_parameter", "mount_path"}
    assert "empty_dir_mounts" not in fields["KubernetesExecutorConfig"]
    # What kfp-kubernetes 2.17 writes as is: the 2.2.0 driver refuses it (so the parse is strict).
    *_, config = old
    for newer in ({"secretAsEnv": [{"secretName": "s", "secretNameParameter": {"runtimeValue": {"constant": "s"}}}]},
                  {"secretAsEnv": [{"secretName": "s", "optional": False}]},
                  {"emptyDirMounts": [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"}]}):
        with pytest.raises(json_format.ParseError):
            json_format.ParseDict(newer, config())


@pytest.mark.parametrize("name", [n for n in IRS if n != "shards"])
def test_the_ir_runs_on_backend_2_2_0_and_loses_nothing_there(compiled, old, name):
    params, spec, platform = compiled[name]
    pipeline_spec, platform_spec, container_spec, kubernetes_config = old
    assert backends.minimum(spec, platform) == "2.2.0"
    # The API server parses both documents strictly at upload (protojson.Unmarshal,
    # backend/src/apiserver/template/v2_template.go at 2.2.0).
    json_format.ParseDict(spec, pipeline_spec())
    json_format.ParseDict(platform, platform_spec())
    # The driver parses each step's Kubernetes config strictly (jsonpb.UnmarshalString): it
    # fails the step on an unknown field; parsed back, nothing is lost.
    for executor, config in kubernetes_configs(platform).items():
        parsed = json_format.ParseDict(config, kubernetes_config())
        assert json_format.MessageToDict(parsed) == config, executor
    # The container spec reaches the driver with unknown fields dropped (GetDeploymentConfig,
    # AllowUnknownFields): what is left must still hold the image, command, env, resources, GPUs.
    counts = pods.gpus(params)
    for executor, body in spec["deploymentSpec"]["executors"].items():
        container = body["container"]
        kept = json_format.MessageToDict(json_format.ParseDict(container, container_spec(),
                                                               ignore_unknown_fields=True))
        assert {k: kept.get(k) for k in ("image", "command", "args", "env")} == \
            {k: container.get(k) for k in ("image", "command", "args", "env")}, executor
        pod = pods.pods()[executor.removeprefix("exec-")]
        resources = kept["resources"]
        assert resources["cpuRequest"] == pod.cpu
        assert resources["memoryLimit"] == resources["memoryRequest"] > 0
        stage = executor.removeprefix("exec-").split("-")[0]
        if counts.get(stage):
            assert resources["accelerator"] == {"type": "nvidia.com/gpu", "count": str(counts[stage])}, executor
        else:
            assert "accelerator" not in resources, executor
    if name in ("gpu", "full"):
        assert any(counts.values())


def test_sharded_extraction_needs_2_14_0_and_says_why(compiled, old):
    _, spec, platform = compiled["shards"]
    needs = backends.needs(spec, platform)
    assert [f.since for f in needs] == ["2.14.0"] and "dsl.Collected" in needs[0].name
    for config in kubernetes_configs(platform).values():  # still the older form
        json_format.ParseDict(config, old[3]())


@pytest.mark.parametrize("backend, feature, key", [("2.3.0", "/dev/shm", "emptyDirMounts"),
                                                   ("2.4.1", "retries", "retryPolicy")])
def test_newer_features_go_in_only_when_kfp_backend_allows(tmp_path, monkeypatch, backend, feature, key):
    monkeypatch.setenv("MOFE_IMAGE", IMAGE)
    gpu = {"train": {"gpus": 1}}
    texts = {}
    for asked in ("2.2.0", backend):
        params = merged(load(ROOT / "params.yaml"), {**gpu, "kfp": {"backend": asked}})
        texts[asked] = pipeline.compile_ir(params, tmp_path / f"{asked}.yaml").read_text()
    assert key not in texts["2.2.0"] and key in texts[backend]
    spec, platform = yaml.safe_load_all(texts[backend])
    assert backends.minimum(spec, platform) == backend
    assert any(feature in f.name for f in backends.needs(spec, platform))


def test_kfp_backend_below_the_oldest_supported_is_refused():
    from mofe_ood.params import ParamError

    for bad in ("2.1.0", "2.2", 2.4, "latest"):
        with pytest.raises(ParamError, match=r"kfp.backend: .* 2\.2\.0 \(Kubeflow 1\.9\) or newer"):
            stages.kfp_config(merged(load(ROOT / "params.yaml"), {"kfp": {"backend": bad}}))


def test_every_step_pulls_with_the_secret_and_policy_asked_for(compiled):
    _, spec, platform = compiled["pull"]
    configs = kubernetes_configs(platform)
    assert set(configs) == set(spec["deploymentSpec"]["executors"])
    for executor, config in configs.items():
        assert config["imagePullSecret"] == [{"secretName": "regcred"}], executor
        assert config["imagePullPolicy"] == "Always", executor
    _, _, default = compiled["default"]
    assert not [c for c in kubernetes_configs(default).values() if "imagePullSecret" in c or "imagePullPolicy" in c]
