"""Stage `register` and `mofe promote` against a real MLflow (embedded sqlite in a temp folder),
and the registered model served by `mlflow models serve`."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mofe_ood import cli, register
from mofe_ood.bench.serve import declared_png, free_port, request_body, start_server, stop_server
from mofe_ood.images import encode_png
from mofe_ood.params import merged
from mofe_ood.registry.gate import Candidate, decide
from mofe_ood.registry.tracking import tracking_uri

NAME = "mofe-ood"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def with_metrics(project: Path, dest: Path, variant: str, **changes) -> Path:
    """A copy of the project's reports whose registered-variant metrics are changed (same model):
    metrics.json's to the values given, metrics_val.json's (what the gate reads) by the same step."""
    shutil.copytree(project / "reports", dest)
    data, val = (json.loads((dest / f).read_text()) for f in ("metrics.json", "metrics_val.json"))
    for key, value in changes.items():
        if key == "id_accuracy":
            val[variant]["id_accuracy"] += value - data[variant]["id_accuracy"]
            data[variant]["id_accuracy"] = value
        else:
            group, metric = key.split("__")
            val[variant]["knn"][group][metric] += value - data[variant]["knn"][group][metric]
            data[variant]["knn"][group][metric] = value
    (dest / "metrics.json").write_text(json.dumps(data))
    (dest / "metrics_val.json").write_text(json.dumps(val))
    return dest


@pytest.fixture(scope="module")
def project(tiny_project):
    root = tiny_project  # with the tiny run's params.yaml; register reads DVC hashes from a dvc.lock
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "extract": {"cmd": "mofe extract", "outs": [{"path": "data/features", "hash": "md5",
                                                     "md5": "0123abcd.dir"}]}}}))
    return root


@pytest.fixture(scope="module")
def registry(project, tmp_path_factory, tiny_variant, tiny_run):
    """An embedded MLflow with version 1 (the real metrics) and version 2 (worse near AUROC)."""
    home = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{home}/mlflow.db"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = os.getcwd()
    os.chdir(project)
    try:
        first = register.run(tiny_run(), out=home / "first.json")
        near = json.loads((project / "reports" / "metrics.json").read_text())[tiny_variant]["knn"]["near"]["auroc"]
        worse = with_metrics(project, home / "worse", tiny_variant, near__auroc=near - 0.05)
        second = register.run(tiny_run(), reports_dir=worse, out=home / "second.json")
        yield {"uri": uri, "home": home, "first": first, "second": second, "near": near}
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


def versions(uri) -> list[int]:
    return sorted(int(v.version) for v in client(uri).search_model_versions(f"name = '{NAME}'"))


def aliases(uri) -> dict[str, str]:
    return {a: str(v) for a, v in client(uri).get_registered_model(NAME).aliases.items()}


@pytest.mark.slow
def test_first_registration_logs_the_run_and_becomes_champion(registry, project, tiny_variant):
    first, uri = registry["first"], registry["uri"]
    assert first["version"] == 1 and first["alias"] == "champion" and first["new_version"]
    assert json.loads((registry["home"] / "first.json").read_text()) == first
    c = client(uri)
    run = c.get_run(first["run_id"])
    assert run.data.params["train.variants"] == json.dumps([tiny_variant])
    assert run.data.params["extract.image_size"] == "32"
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    near = metrics[tiny_variant]["knn"]["near"]["auroc"]
    assert run.data.metrics[f"{tiny_variant}.knn.near.auroc"] == pytest.approx(near)
    assert run.data.metrics["near_auroc"] == pytest.approx(registry["near"])
    assert run.data.tags["dvc.data/features"] == "0123abcd.dir" and "git_commit" in run.data.tags
    logged = {a.path for a in c.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/results.md", "reports/metrics.json", "reports/plots"} <= logged
    assert any(a.path.endswith(".png") for a in c.list_artifacts(run.info.run_id, "reports/plots"))
    tags = c.get_model_version(NAME, "1").tags
    assert tags["variant"] == tiny_variant and tags["dataset"].startswith("fashion_mnist")
    assert float(tags["near_auroc"]) == pytest.approx(registry["near"], abs=1e-6)
    assert {"far_auroc", "near_fpr95", "far_fpr95", "content_hash"} <= set(tags)
    assert tags["decision"] == "champion" and tags["registration"] == "done"
    # The gate read validation metrics only (the OOD sets' validation parts), and says so.
    val = json.loads((project / "reports" / "metrics_val.json").read_text())[tiny_variant]["knn"]["near"]["auroc"]
    assert first["gate_split"] == tags["gate_split"] == "val" and first["gate_value"] == pytest.approx(val)


@pytest.mark.slow
def test_a_worse_model_becomes_challenger_and_the_champion_stays(registry):
    second, uri = registry["second"], registry["uri"]
    assert second["version"] == 2 and second["alias"] == "challenger"
    assert "not above the margin" in second["reason"]
    assert aliases(registry["uri"]) == {"champion": "1", "challenger": "2"}
    assert "not above the margin" in client(uri).get_model_version(NAME, "2").tags["reason"]


@pytest.mark.slow
def test_registering_the_same_content_again_adds_no_version(registry, project, tiny_run):
    again = register.run(tiny_run(), out=registry["home"] / "again.json")
    assert again["version"] == 1 and not again["new_version"] and "already registered" in again["reason"]
    assert versions(registry["uri"]) == [1, 2]
    assert aliases(registry["uri"]) == {"champion": "1", "challenger": "2"}


@pytest.mark.slow
def test_unreachable_server_fails_fast_naming_it_and_writes_nothing(registry, project, monkeypatch, capsys, tiny_run):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"MLflow tracking server {url} is unreachable"):
        register.run(tiny_run(), out=registry["home"] / "down.json")
    assert time.monotonic() - start < 30
    assert cli.main(["register"]) == 2
    assert url in capsys.readouterr().err
    assert cli.main(["promote", "--version", "2"]) == 2
    assert url in capsys.readouterr().err
    assert not (registry["home"] / "down.json").exists()
    assert versions(registry["uri"]) == [1, 2]


@pytest.mark.slow
def test_a_failed_alias_move_leaves_the_old_champion(registry, project, monkeypatch, tmp_path, tiny_variant, tiny_run):
    from mlflow import MlflowClient

    better = with_metrics(project, tmp_path / "better", tiny_variant, near__auroc=registry["near"] + 0.05)

    def broken(*args, **kwargs):
        raise RuntimeError("registry went away")

    with monkeypatch.context() as m:  # the new version is removed again
        m.setattr(MlflowClient, "set_registered_model_alias", broken)
        with pytest.raises(RuntimeError, match="went away"):
            register.run(tiny_run(), reports_dir=better, out=tmp_path / "r.json")
        assert versions(registry["uri"]) == [1, 2]
        assert aliases(registry["uri"])["champion"] == "1"
        m.setattr(MlflowClient, "delete_model_version", broken)  # ... or stays marked pending
        with pytest.raises(RuntimeError, match="went away"):
            register.run(tiny_run(), reports_dir=better, out=tmp_path / "r.json")
    *_, pending = versions(registry["uri"])  # MLflow does not reuse the removed version's number
    assert versions(registry["uri"]) == [1, 2, pending]
    assert aliases(registry["uri"])["champion"] == "1"
    assert client(registry["uri"]).get_model_version(NAME, str(pending)).tags["registration"] == "pending"
    # A better model whose ID accuracy drops too much is held back ...
    acc = json.loads((project / "reports" / "metrics.json").read_text())[tiny_variant]["id_accuracy"]
    dropped = with_metrics(project, tmp_path / "dropped", tiny_variant, near__auroc=registry["near"] + 0.05,
                           id_accuracy=acc - 0.05)
    held = register.run(tiny_run(), reports_dir=dropped, out=tmp_path / "held.json")
    assert held["version"] > pending and held["alias"] == "challenger" and "ID accuracy" in held["reason"]
    # ... while the better one, registered again, finishes its pending version and takes over.
    retry = register.run(tiny_run(), reports_dir=better, out=tmp_path / "r.json")
    assert retry["version"] == pending and not retry["new_version"]
    assert retry["alias"] == "champion" and retry["previous_champion"] == "1"
    assert aliases(registry["uri"]) == {"champion": str(pending), "challenger": str(held["version"])}
    assert versions(registry["uri"]) == [1, 2, pending, held["version"]]


@pytest.mark.slow
def test_promote_applies_the_gate_unless_forced(registry, project, capsys):
    champion = aliases(registry["uri"])["champion"]
    assert cli.main(["promote", "--version", "2"]) == 2
    assert "not promoted" in capsys.readouterr().err
    assert aliases(registry["uri"])["champion"] == champion
    assert cli.main(["promote", "--version", "99"]) == 2
    assert "no version 99" in capsys.readouterr().err
    assert cli.main(["promote", "--version", "2", "--force"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 2 and out["previous_champion"] == champion
    assert aliases(registry["uri"])["champion"] == "2"
    assert client(registry["uri"]).get_model_version(NAME, "2").tags["reason"].startswith("promote: forced")
    # Promoting a better version back passes the gate without --force.
    assert cli.main(["promote", "--version", champion]) == 0
    assert aliases(registry["uri"])["champion"] == champion


@pytest.mark.slow
def test_mofe_score_reads_the_registered_champion(registry, project, capsys, tiny_variant):
    results = []
    for model in (f"models:/{NAME}@champion", f"models/{tiny_variant}"):
        assert cli.main(["score", "images/fmnist_near", "--model", model]) == 0
        results.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    from_registry, local = results
    assert len(from_registry) == 48  # the near set's test part
    for a, b in zip(from_registry, local):
        assert a["path"] == b["path"] and a["class"] == b["class"] and a["is_ood"] == b["is_ood"]
        # The registered bundle runs the backbone on ONNX Runtime, models/ on torch: float rounding apart.
        assert a["ood_score"] == pytest.approx(b["ood_score"], abs=1e-5)


def test_gate_rules(tiny_variant, tiny_run):
    p = register.config(tiny_run())
    old = Candidate(tiny_variant, "knn", "near.auroc", 0.80, 0.95, "b1")
    new = lambda **kw: Candidate(**{**vars(old), **kw})  # noqa: E731
    gate = lambda c, champion=old: decide(c, "1", champion, p.margin, p.accuracy_tolerance)  # noqa: E731
    assert gate(new(gate_value=0.81)).alias == "champion"
    assert gate(new(gate_value=0.8005)).alias == "challenger"  # within the margin
    assert gate(new(gate_value=0.81, id_accuracy=0.94)).alias == "challenger"
    assert gate(new(gate_value=0.81, id_accuracy=0.946)).alias == "champion"
    assert "other data" in gate(new(gate_value=0.9, benchmark="b2")).reason
    fpr = dict(gate_metric="far.fpr95", gate_value=0.30)
    assert gate(new(**{**fpr, "gate_value": 0.20}), new(**fpr)).alias == "champion"
    assert gate(new(**{**fpr, "gate_value": 0.40}), new(**fpr)).alias == "challenger"
    # A champion gated on its test metrics (before the val/test split) is not comparable.
    assert "not comparable" in gate(new(gate_value=0.9), new(gate_split="test")).reason
    assert Candidate.from_tags({"gate_value": "0.8"}).gate_split == "test"
    with pytest.raises(register.ParamError, match="register.gate_metric"):
        register.config(merged(tiny_run(), {"register": {"gate_metric": "near.accuracy"}}))


def test_register_variant_auto_is_the_variant_chosen_on_validation(tmp_path):
    from mofe_ood.registry.gate import registered_variant

    assert registered_variant("mofe_block", tmp_path) == "mofe_block"  # a name: as given
    with pytest.raises(FileNotFoundError, match="selection.json does not exist"):
        registered_variant("auto", tmp_path)
    (tmp_path / "selection.json").write_text(json.dumps({"split": "val", "variant": "top", "score": "knn"}))
    assert registered_variant("auto", tmp_path) == "top"
    (tmp_path / "selection.json").write_text(json.dumps({"split": "val", "variant": None}))
    with pytest.raises(register.ParamError, match="register.variant: auto, but evaluate chose no variant"):
        registered_variant("auto", tmp_path)


def test_a_dvc_experiment_never_takes_champion(monkeypatch, tiny_variant, tiny_run):
    p = register.config(tiny_run())
    old = Candidate(tiny_variant, "knn", "near.auroc", 0.80, 0.95, "b1")
    better = Candidate(**{**vars(old), "gate_value": 0.90})
    assert register.gate(better, "1", old, p).alias == "champion"
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-7")
    decision = register.gate(better, "1", old, p)
    assert decision.alias == "challenger" and "sweep-7" in decision.reason
    assert "gain +0.1000" in decision.reason  # what the gate would have said
    assert register.gate(better, None, None, p).alias == "challenger"  # an empty registry too


def test_the_registry_is_the_projects_in_a_dvc_temp_workspace(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_the_served_model_answers_each_row(registry, project, tmp_path, capsys, tiny_images):
    """4 rows in, 4 answers out: bad rows get their own error, the good ones what `mofe score` gives."""
    images = [tiny_images("test")[0], tiny_images("fmnist_near")[0]]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"good{i}.png")
        files[-1].write_bytes(encode_png(image))
    assert cli.main(["score", *map(str, files), "--model", f"models:/{NAME}@champion"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    rows = [b64(files[0].read_bytes()), "not base64!", b64(declared_png(9000, 9000)), b64(files[1].read_bytes())]
    env = {"MLFLOW_TRACKING_URI": registry["uri"], "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    port = free_port()
    server = start_server(f"models:/{NAME}@champion", port, tmp_path / "serve.log", env)
    try:
        status, answer = post(port, request_body(rows))
        # A decompression bomb (50,000 x 50,000 declared) is one bad row; the server goes on.
        bomb_status, bomb = post(port, request_body([b64(declared_png(50_000, 50_000))]))
        after_status, after = post(port, request_body([rows[0]]))
        # Malformed as a request: refused whole, saying what is expected.
        columns_status, columns = post(port, json.dumps({"dataframe_split": {"columns": ["picture"],
                                                                             "data": [[rows[0]]]}}).encode())
        json_status, _ = post(port, b"{not json")
    finally:
        stop_server(server)
    assert status == 200, answer
    got = answer["predictions"]
    assert len(got) == 4
    for row, want in zip([got[0], got[3]], scored):
        assert row["error"] is None and row["class"] == want["class"] and row["is_ood"] == want["is_ood"]
        assert row["ood_score"] == pytest.approx(want["ood_score"], abs=1e-6)
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-6)
    assert got[1]["error"].startswith("not base64") and got[1]["class"] is None
    assert got[2]["error"].startswith("image too large: 9000x9000 pixels") and got[2]["ood_score"] is None
    assert bomb_status == 200 and bomb["predictions"][0]["error"].startswith("image too large: 2,500,000,000 pixels")
    assert after_status == 200 and after["predictions"][0]["ood_score"] == pytest.approx(got[0]["ood_score"],
                                                                                         abs=1e-6)
    assert columns_status == 400 and "expected a column 'image'" in columns["message"], columns
    assert json_status == 400


def chromium(*args: str, timeout: int = 90) -> str:
    """Headless Chromium (Debian's package): the page after its scripts ran (--dump-dom) or a screenshot."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=30000", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_champion_and_its_run_metrics(registry, tmp_path):
    """What a user sees: the registered model's page in a real browser against a real server."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        if os.environ.get("MOFE_REQUIRE_BROWSER") == "1":
            pytest.fail("MOFE_REQUIRE_BROWSER=1 but chromium is not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    uri, port = registry["uri"], free_port()
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=log, stderr=log,
                              start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # a cold MLflow server takes ~20 s on 2 cores
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("MLflow server did not answer within 120 s: " + (tmp_path / "mlflow.log").read_text()[-2000:])
        champion = aliases(uri)["champion"]
        version = client(uri).get_model_version(NAME, champion)
        run = client(uri).get_run(version.run_id)
        page = f"{base}/#/models/{NAME}/versions/{champion}"
        dom = chromium("--dump-dom", page)
        assert "champion" in dom and f"Version {champion}" in dom
        run_dom = chromium("--dump-dom", f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        for metric in ("near_auroc", "far_fpr95", "id_accuracy"):
            assert metric in run_dom, metric
        shot = ROOT / "reports" / "mlflow_model_version.png"
        shot.parent.mkdir(exist_ok=True)
        chromium(f"--screenshot={shot}", page)
        assert shot.stat().st_size > 10_000
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_mofe_registry_lists_each_version_as_the_gate_left_it(registry, project, capsys):
    assert cli.main(["registry", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_version = {r["version"]: r for r in rows}
    champion = int(aliases(registry["uri"])["champion"])
    assert [r["version"] for r in rows] == sorted(versions(registry["uri"]), reverse=True)  # newest first
    assert by_version[champion]["aliases"] == ["champion"]
    c = client(registry["uri"])
    for r in rows:
        tags = c.get_model_version(NAME, str(r["version"])).tags
        assert r["gate_metric"] == "near.auroc" and r["gate_value"] == pytest.approx(float(tags["gate_value"]))
        assert r["decision"] == tags["decision"] and r["reason"] == tags["reason"]
        assert r["split"] == tags["gate_split"] == "val"  # what the gate read: the OOD validation parts
        assert r["git_commit"] == c.get_run(r["run_id"]).data.tags["git_commit"]
    # the gate values are the validation parts' near AUROC; version 2's was made 0.05 worse
    assert by_version[1]["gate_value"] == pytest.approx(registry["first"]["gate_value"])
    assert by_version[2]["gate_value"] == pytest.approx(registry["first"]["gate_value"] - 0.05)
    assert cli.main(["registry"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"registered model {NAME}: {len(rows)} version(s)" and table[1].split()[:3] == [
        "version", "aliases", "variant"]
    line = next(t for t in table[2:] if t.split()[0] == str(champion))
    assert "champion" in line and f"near.auroc={by_version[champion]['gate_value']:.4f}" in line


@pytest.mark.slow
def test_a_wrong_model_reference_gets_one_line_naming_what_exists(registry, project, capsys):
    there = aliases(registry["uri"])
    listed = ", ".join(f"@{a} (version {v})" for a, v in sorted(there.items()))
    numbers = ", ".join(map(str, versions(registry["uri"])))  # earlier tests of the module add some
    for model, expected in ((f"models:/{NAME}@nosuch", f"model '{NAME}' has no alias 'nosuch' (aliases: {listed})"),
                            (f"models:/{NAME}/99", f"model '{NAME}' has no version '99' (versions: {numbers})"),
                            ("models:/other@champion",
                             f"no registered model 'other' in this registry (models: {NAME})")):
        assert cli.main(["score", "images/fmnist_near", "--model", model]) == 2
        err = capsys.readouterr().err
        assert err == f"mofe score: error: {model}: {expected}\n"
    assert cli.main(["score", "images/fmnist_near", "--model", f"models:/{NAME}@champion"]) == 0
    err = capsys.readouterr().err
    assert f"mofe score: model models:/{NAME}@champion (version {there['champion']}): variant" in err
