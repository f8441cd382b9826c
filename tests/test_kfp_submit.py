"""`pipeline.py submit` against a fake KFP API (tests/fake_kfp.py): the server's version checked
before any upload, versions named by the commit and the IR, a namespace's own pipeline."""

import json

import pytest
import yaml

import pipeline
from kfpipe import server
from tests.fake_kfp import FakeKFP
from tests.fake_registry import FakeRegistry

ROOT = pipeline.ROOT
FAKE_SECRET = "not-a-real-secret-5f3a9c"
COMMIT = "0123456789ab"


@pytest.fixture(autouse=True)
def one_commit(monkeypatch, tmp_path):
    """Every submit here at one clean commit (the checkout under test may be dirty), its image
    pushed to a registry on loopback."""
    monkeypatch.setattr("kfpipe.pods.image_tag", lambda: COMMIT)
    with FakeRegistry({"mofe-ood:test"}) as registry:
        monkeypatch.setenv("MOFE_IMAGE", f"{registry.host}/mofe-ood:test")
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-auth.json"))
        yield registry
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps credentials under ~
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)


def submit(kfp: FakeKFP, *args: str) -> int:
    return pipeline.main(["submit", "--host", kfp.url, "--experiment", "mofe-test", *args])


def run_ir(kfp: FakeKFP, run: dict) -> tuple[dict, dict]:
    """The IR of the pipeline version a run started."""
    return tuple(yaml.safe_load_all(kfp.version_yaml(run["pipeline_version_reference"]["pipeline_version_id"])))


def test_each_ir_of_a_commit_is_a_version_of_its_own_and_runs_as_compiled(capsys):
    """default, train.gpus=1 and presets/full.yaml at one commit: three versions, each run with
    its own IR; the same three again: no upload, three more runs of them."""
    asked = {"default": [], "gpu": ["--set", "train.gpus=1"], "full": ["--params", str(ROOT / "presets/full.yaml")]}
    gpus = {"default": 0, "gpu": 1, "full": 1}
    with FakeKFP() as kfp:
        for _ in range(2):
            for args in asked.values():
                assert submit(kfp, *args) == 0, capsys.readouterr().err
        names = [v["display_name"] for v in kfp.state.versions]
        assert names[0] == "mofe-ood"  # KFP makes the pipeline's first version of the first upload
        ours = names[1:]
        assert len(ours) == 3 and len(set(ours)) == 3
        assert all(n.startswith(f"mofe-ood-{COMMIT}-") for n in ours)
        assert len(kfp.state.runs) == 6
        for run, name in zip(kfp.state.runs, list(asked) * 2):
            spec, platform = run_ir(kfp, run)
            train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
            assert train.get("accelerator", {}).get("count", "0") == str(gpus[name]), name
            arguments = run["runtime_config"]["parameters"]
            assert json.loads(arguments["train"])["gpus"] == gpus[name]
            # the run's arguments are the IR's defaults: what was compiled is what runs
            defaults = {k: v["defaultValue"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
            assert arguments == defaults, name
        assert FAKE_SECRET not in json.dumps(kfp.state.runs) + "".join(v["yaml"] for v in kfp.state.versions)


def test_a_dirty_tree_never_reuses_a_version(monkeypatch, capsys):
    monkeypatch.setattr("kfpipe.pods.image_tag", lambda: COMMIT + "-dirty")
    with FakeKFP() as kfp:
        for _ in range(2):
            assert submit(kfp) == 0, capsys.readouterr().err
        ours = [v["display_name"] for v in kfp.state.versions][1:]
        assert len(ours) == 2 and ours[0] != ours[1]
        assert all(n.startswith(f"mofe-ood-{COMMIT}-dirty-") for n in ours)
        assert [r["pipeline_version_reference"]["pipeline_version_id"] for r in kfp.state.runs] == ["ver-2", "ver-3"]


def test_submit_to_a_namespace_finds_and_versions_its_own_pipeline(capsys):
    with FakeKFP() as kfp:
        # A shared pipeline of the same name: not the namespace's, so neither found nor versioned.
        kfp.state.pipelines.append({"pipeline_id": "shared", "display_name": "mofe-ood", "namespace": ""})
        for _ in range(2):
            assert submit(kfp, "--namespace", "alice") == 0, capsys.readouterr().err
        (own,) = [p for p in kfp.state.pipelines if p["namespace"] == "alice"]
        uploads = [path for path, _ in kfp.state.posts if path.startswith("/apis/v2beta1/pipelines/upload")]
        assert uploads == ["/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version"]
        refs = [r["pipeline_version_reference"] for r in kfp.state.runs]
        assert len(refs) == 2 and refs[0] == refs[1] and refs[0]["pipeline_id"] == own["pipeline_id"]


@pytest.mark.parametrize("version, args, expected", [
    ("2.5.0", ["--set", "extract.shards=4"], ["dsl.Collected", ">= 2.14.0", "runs KFP backend 2.5.0"]),
    ("2.2.0", ["--set", "kfp.backend=2.4.1"], ["retries", ">= 2.4.1", "runs KFP backend 2.2.0"]),
    ("2.1.3", [], ["supports KFP backends >= 2.2.0", "runs KFP backend 2.1.3"]),
    ("", ["--set", "extract.shards=4"], ["does not report its version", ">= 2.14.0", "--no-version-check"]),
])
def test_submit_refuses_an_ir_the_server_is_too_old_for_before_uploading(capsys, version, args, expected):
    with FakeKFP(version=version) as kfp:
        assert submit(kfp, *args) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert kfp.state.posts == []


def test_submit_runs_the_default_ir_on_the_oldest_backend(capsys):
    with FakeKFP(version="2.2.0") as kfp:
        assert submit(kfp) == 0, capsys.readouterr().err
        assert len(kfp.state.runs) == 1
    with FakeKFP(version="") as kfp:  # a server that does not say: the default IR needs nothing newer
        assert submit(kfp) == 0
        assert "does not report its version; the IR runs on backends >= 2.2.0" in capsys.readouterr().err
        assert len(kfp.state.runs) == 1


def test_version_names_follow_the_ir(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("a: 1\n")
    two.write_text("a: 2\n")
    assert server.version_name(one, COMMIT) == server.version_name(one, COMMIT) != server.version_name(two, COMMIT)
    assert server.version_name(one, COMMIT + "-dirty") != server.version_name(one, COMMIT + "-dirty")


@pytest.mark.parametrize("image, expected", [
    (None, "names no registry, so a cluster would pull docker.io/library/mofe-ood"),
    ("mofe-ood:0123456789ab", "names no registry"),
    ("registry.example.org/mofe-ood:0123456789ab-dirty", "built from a dirty tree"),
])
def test_submit_refuses_an_image_a_cluster_cannot_pull_as_built(monkeypatch, capsys, image, expected):
    if image:
        monkeypatch.setenv("MOFE_IMAGE", image)
    else:  # kfp.image as params.yaml has it: no registry, the commit's tag added
        monkeypatch.delenv("MOFE_IMAGE")
    with FakeKFP() as kfp:
        assert submit(kfp) == 2
        assert expected in capsys.readouterr().err
        assert kfp.state.posts == []
    for fine in ("localhost:5000/mofe-ood:abc", "registry.example.org/team/mofe-ood@sha256:" + "0" * 64):
        server.check_image(fine)


def test_submit_refuses_an_image_its_registry_does_not_have(monkeypatch, capsys, one_commit):
    monkeypatch.setenv("MOFE_IMAGE", f"{one_commit.host}/mofe-ood:not-pushed")
    with FakeKFP() as kfp:
        assert submit(kfp) == 2
        err = capsys.readouterr().err
        assert f"image {one_commit.host}/mofe-ood:not-pushed is not in its registry" in err
        assert "make image-push" in err and kfp.state.posts == []
        assert submit(kfp, "--no-image-check") == 0  # the user's word that the cluster can pull it


def test_the_image_check_follows_a_registry_token_challenge():
    with FakeRegistry({"team/mofe-ood:abc"}, token=True) as registry:
        assert server.image_in_registry(f"{registry.host}/team/mofe-ood:abc") is True
        assert server.image_in_registry(f"{registry.host}/team/mofe-ood:other") is False
    assert server.image_in_registry(f"{registry.host}/team/mofe-ood:abc") is None  # no answer: not known
