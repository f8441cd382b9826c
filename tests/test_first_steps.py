"""What a DVC, MLflow or Kubeflow user does first (issue 22): compare runs on a few headline
numbers, read what `mofe score` did, get a hint when S3 credentials are missing, see plots offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dvc_render.html import PAGE_HTML

from mofe_ood import cli, headline


def test_headline_is_the_registered_variant_and_each_variant_at_its_default_score(tiny_project, tiny_run,
                                                                                  tiny_variant):
    reports = tiny_project / "reports"
    written = json.loads((reports / "headline.json").read_text())  # what evaluate.run wrote
    all_metrics = json.loads((reports / "metrics.json").read_text())
    thresholds = json.loads((reports / "thresholds.json").read_text())
    assert written == headline.content(all_metrics, thresholds, tiny_run()["register"]["variant"])
    assert set(written) == {"registered", "frozen", tiny_variant}
    # registered: the variant register ships, at its default score (what thresholds.json calibrates)
    ship = all_metrics[tiny_variant][thresholds[tiny_variant]["score"]]
    assert written["registered"] == {
        "near_auroc": ship["near"]["auroc"], "near_fpr95": ship["near"]["fpr95"],
        "mnist_auroc": ship["mnist"]["auroc"], "mnist_fpr95": ship["mnist"]["fpr95"],
        "far_auroc": ship["far"]["auroc"], "far_fpr95": ship["far"]["fpr95"],
        "id_accuracy": all_metrics[tiny_variant]["id_accuracy"]}
    # each variant: at its default score, chosen on validation; frozen has no classifier, no ID accuracy
    for variant in ("frozen", tiny_variant):
        default = thresholds[variant]["score"]
        assert written[variant]["near_auroc"] == all_metrics[variant][default]["near"]["auroc"]
    assert "id_accuracy" not in written["frozen"]
    numbers = [v for entry in written.values() for v in entry.values()]
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in numbers) and len(numbers) == 7 + 6 + 7


def test_mofe_score_says_what_it_did(tiny_project, tmp_path, monkeypatch, capsys, tiny_variant):
    monkeypatch.chdir(tiny_project)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for p in sorted((tiny_project / "images" / "fmnist_near").glob("*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "README.md").write_text("neither")
    (folder / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "scores.csv"
    assert cli.main(["-v", "score", str(folder), "--model", f"models/{tiny_variant}", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mofe score:")]
    threshold = json.loads((tiny_project / "reports" / "thresholds.json").read_text())[tiny_variant]["threshold"]
    assert err[0] == (f"mofe score: model models/{tiny_variant}: variant {tiny_variant}, score knn, "
                      f"threshold {threshold:.6g} at 95% ID TPR (is_ood: ood_score below it)")
    assert err[1] == "mofe score: 3 images scored, 0 unreadable, 3 skipped (2 not image files by name, 1 hidden)"
    assert sorted(err[2:5]) == sorted([
        f"mofe score: skipped {folder / '.DS_Store'}: hidden file",
        f"mofe score: skipped {folder / 'notes.txt'}: not an image file name (.bmp, .gif, .jpeg, .jpg, "
        ".pgm, .png, .ppm, .tif, .tiff, .webp)",
        f"mofe score: skipped {folder / 'sub' / 'README.md'}: not an image file name (.bmp, .gif, .jpeg, "
        ".jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)"])
    assert err[5] == f"mofe score: wrote 3 rows (path, class, probability, ood_score, is_ood, error) to {out}"
    assert len(out.read_text().splitlines()) == 1 + 3
    # without -v the count and how to see the names
    assert cli.main(["score", str(folder), "--model", f"models/{tiny_variant}"]) == 0
    assert "3 skipped (2 not image files by name, 1 hidden; -v names them)" in capsys.readouterr().err
    # a folder with no image gets the count of what it skipped
    assert cli.main(["score", str(folder / "sub"), "--model", f"models/{tiny_variant}"]) == 2
    assert capsys.readouterr().err == (f"mofe score: error: no image files in {folder / 'sub'} "
                                       "(1 other files: 1 not image files by name)\n")


# Chromium's own calls home (update checks, time, accounts) even with background networking off:
# Google's hosts only. Anything else the proxy sees came from the page.
BROWSER_HOSTS = re.compile(r"^(CONNECT |\w+ https?://)([\w.-]+\.)?(google\.com|googleapis\.com|gvt1\.com)[:/]")


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("MOFE_REQUIRE_BROWSER") == "1":
            pytest.fail("MOFE_REQUIRE_BROWSER=1 but chromium is not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


@contextmanager
def request_log():
    """A proxy on loopback that answers 502 and logs every request sent to it: the browser's only
    way out, so an empty log (less Chromium's own calls home) means the page sent no request out."""
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            seen.append(f"{self.command} {self.path}")
            self.send_error(502)

        do_CONNECT = do_POST = do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
        seen[:] = [line for line in seen if not BROWSER_HOSTS.match(line)]
    finally:
        server.shutdown()
        server.server_close()


def axis_titles(spec) -> tuple[set, set]:
    """The titles of every x and every y encoding in a (layered) vega-lite spec."""
    found: tuple[set, set] = (set(), set())
    if isinstance(spec, dict):
        for axis, titles in zip(("x", "y"), found):
            if isinstance(spec.get("encoding", {}).get(axis), dict):
                titles.add(spec["encoding"][axis].get("title"))
        children = spec.values()
    else:
        children = spec if isinstance(spec, list) else []
    for child in children:
        x, y = axis_titles(child)
        found[0].update(x)
        found[1].update(y)
    return found


def rendered_charts(page: Path, proxy_port: int) -> tuple[int, int]:
    """(plots on `page`, charts vega drew: a canvas with a size) after headless Chromium ran its scripts."""
    done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>",
                           # the browser's own calls home (time, updates) are not the page's requests
                           "--disable-background-networking", "--disable-component-update", "--no-first-run",
                           "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout  # vega-embed replaces each plot's div content (its script) with the chart
    drawn = re.findall(r'<canvas width="[1-9]\d*" height="[1-9]\d*" class="marks"', dom)
    return page.read_text().count("vegaEmbed('#"), len(drawn)


@pytest.mark.slow
def test_dvc_plots_show_draws_every_chart_offline(tiny_project, tmp_path, project_root, venv_bin, tiny_variant):
    repo = tmp_path / "repo"
    for name in ("dvc.yaml", ".dvc/config", "infra/plots/offline.html"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project_root / name, repo / name)
    shutil.copytree(tiny_project / "reports" / "roc", repo / "reports" / "roc")
    (repo / "models" / tiny_variant).mkdir(parents=True)
    shutil.copy(tiny_project / "models" / tiny_variant / "history.csv", repo / "models" / tiny_variant)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    def dvc(*args: str) -> str:
        return subprocess.run([str(venv_bin / "dvc"), *args], cwd=repo, env=env, check=True,
                              capture_output=True, text=True).stdout

    specs = json.loads(dvc("plots", "show", "--json"))["data"]
    roc = [n for n in specs if n.startswith("reports/roc/")]
    assert len(roc) == len(list((repo / "reports" / "roc").iterdir()))
    assert {"training loss", "validation accuracy"} <= set(specs)
    titles = {n: axis_titles(specs[n][0]["content"]) for n in (roc[0], "training loss", "validation accuracy")}
    assert titles == {roc[0]: ({"FPR (OOD accepted)"}, {"TPR (ID accepted)"}),  # one quantity per axis
                      "training loss": ({"epoch"}, {"training loss (mixup targets)"}),
                      "validation accuracy": ({"epoch"}, {"ID validation accuracy"})}
    dvc("plots", "show", "-o", "offline")
    with request_log() as (port, seen):
        plots, drawn = rendered_charts(repo / "offline" / "index.html", port)
    assert (plots, drawn, seen) == (len(roc) + 2, len(roc) + 2, [])
    # The control: DVC's own page asks the CDN for vega and, offline, draws nothing.
    (repo / "cdn.html").write_text(PAGE_HTML)
    dvc("plots", "show", "-o", "cdn", "--html-template", str(repo / "cdn.html"))
    with request_log() as (port, seen):
        plots, drawn = rendered_charts(repo / "cdn" / "index.html", port)
    assert plots == len(roc) + 2 and drawn == 0 and any("cdn.jsdelivr.net" in line for line in seen)


def test_reading_s3_without_credentials_says_which_command_sets_them(tmp_path, monkeypatch):
    from mofe_ood import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # boto3 must find no credentials anywhere, and never ask the EC2 metadata address (no network)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError) as err:
        storage.download("s3://mofe-ood/raw/fashion-mnist", tmp_path / "raw", what="prepare.fashion_mnist_dir")
    assert str(err.value) == (
        "prepare.fashion_mnist_dir: reading s3://mofe-ood/raw/fashion-mnist: no S3 credentials for bucket "
        "'mofe-ood' at http://127.0.0.1:9: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for the local "
        "server: make services && eval \"$(infra/services.sh env)\")")
