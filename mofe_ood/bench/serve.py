"""The registered model under load: `mlflow models serve` on loopback, bounded (ours).

`python -m mofe_ood.bench serve [--model models:/mofe-ood@champion] [--clients 8]
[--requests 5000] [--batch-clients 4] [--batches 25] [--batch-size 32] [--bad-every 20]`
from the project root after `make run` (it reads the project's registry, mlflow.db, and
the benchmark's test images, data/prepared). It starts the model with `mlflow models
serve --env-manager local` on 127.0.0.1 and a free port, sends

1. `requests` single-image requests from `clients` threads (keep-alive connections);
2. `batches` requests of `batch_size` rows from each of `batch-clients` threads;

where every `bad-every`-th row is bad, cycling through: not base64, a truncated PNG, a
PNG declaring 50,000 x 50,000 pixels. It samples the server's memory (RSS of its whole
process group) every 0.1 s, stops the server by its process group, and prints requests/s,
images/s, p50/p95/p99 latency per phase, per-row errors by kind (bad rows must all get
one, good rows none), and the peak RSS overall and over the first and the last 1,000
requests. Nothing leaves the machine; each phase is bounded in count and by --timeout.

`--hostile` (issue 19) instead sends `requests` single-image requests from `clients`
threads twice: alone, then while `hostile-clients` threads keep sending what the probe
found (`hostile_bodies`: paths to the server's files, a secret behind a PPM header, wrong
types, a decompression bomb, a 12 MP image, a 30 MB row, more rows than serve.max_rows,
a bad batch_size). It prints p50/p99 of the good requests in both phases, the server's
peak RSS, and whether every hostile row got its own error (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mofe_ood.bench._rows import ROW_KINDS, bad_row, declared_png, hostile_bodies, request_body  # noqa: F401

# declared_png: tests/test_register.py imports it from here

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Seconds the model server gives one request (`mlflow models serve -t`; its default is 60):
# a 264-row request took 2.9 s on 2 cores (README); the proxy (infra/serve) waits 35 s for the answer.
REQUEST_TIMEOUT = 30


def start_server(model: str, port: int, log_path: Path, env: dict | None = None,
                 timeout: float = 180) -> subprocess.Popen:
    """`mlflow models serve` for `model` on 127.0.0.1:`port`, in its own process group, once /ping answers."""
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH: this environment's, even unactivated
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port), "-t", str(REQUEST_TIMEOUT)],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited ({server.returncode}): "
                               f"{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop_server(server)
            raise TimeoutError(f"mlflow models serve did not answer /ping in {timeout:.0f} s; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the CLI and its uvicorn workers), SIGKILL after 15 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(5)
    except ProcessLookupError:
        pass


def group_rss(pgid: int) -> int:
    """Bytes resident in all processes of process group `pgid` (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class Load:
    """Requests from client threads; latencies, errors and the server's memory, recorded as they come."""

    def __init__(self, port: int, server_pid: int):
        self.port, self.pid = port, server_pid
        self.lock = threading.Lock()
        self.done = 0
        self.rss_by_request: list[tuple[int, int]] = []  # (requests done, RSS bytes)
        self.stop_sampling = threading.Event()

    def sample_memory(self) -> None:
        while not self.stop_sampling.wait(0.1):
            rss = group_rss(self.pid)
            with self.lock:
                self.rss_by_request.append((self.done, rss))

    def client(self, bodies: list[tuple[bytes, list[str | None]]], out: list, deadline: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        for body, kinds in bodies:
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            seconds = time.perf_counter() - start
            rows = json.loads(payload)["predictions"] if response.status == 200 else None
            out.append((seconds, response.status, kinds, rows))
            with self.lock:
                self.done += 1
        conn.close()


def plan(images: list[bytes], n_requests: int, rows_per_request: int, bad_every: int, start: int = 0):
    """Request bodies with their rows' kinds (None = good); every `bad_every`-th row bad, kinds cycling."""
    encoded = [base64.b64encode(png).decode() for png in images]
    bodies, index, bad = [], start, 0
    for _ in range(n_requests):
        rows, kinds = [], []
        for _ in range(rows_per_request):
            index += 1
            if bad_every and index % bad_every == 0:
                kind = ROW_KINDS[bad % len(ROW_KINDS)]
                bad += 1
                rows.append(bad_row(kind, images[index % len(images)]))
                kinds.append(kind)
            else:
                rows.append(encoded[index % len(encoded)])
                kinds.append(None)
        bodies.append((request_body(rows), kinds))
    return bodies


def run_phase(load: Load, bodies: list, clients: int, timeout: float) -> dict:
    results: list = []
    per_client = [bodies[i::clients] for i in range(clients)]
    deadline = time.monotonic() + timeout
    start = time.perf_counter()
    threads = [threading.Thread(target=load.client, args=(b, results, deadline)) for b in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.perf_counter() - start)


def error_kind(message: str) -> str:
    """'image too large: 50000x50000 pixels (limit ...)' -> 'image too large'."""
    return message.split(":")[0].split(" (")[0]


def summarize(results: list, seconds: float) -> dict:
    latencies = sorted(r[0] for r in results)
    errors: dict[str, int] = {}
    good_rows = good_errors = bad_rows = bad_answered = http_errors = 0
    for _, _, kinds, rows in results:
        if rows is None:
            http_errors += 1
            continue
        for kind, row in zip(kinds, rows):
            if row.get("error"):
                kind = error_kind(row["error"])
                errors[kind] = errors.get(kind, 0) + 1
            if kind is None:
                good_rows += 1
                good_errors += bool(row.get("error"))
            else:
                bad_rows += 1
                bad_answered += bool(row.get("error"))

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    images = sum(len(k) for _, _, k, rows in results if rows is not None)
    return {"requests": len(results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(results) / seconds, 1), "images_per_s": round(images / seconds, 1),
            "p50_ms": round(pct(0.50), 1), "p95_ms": round(pct(0.95), 1), "p99_ms": round(pct(0.99), 1),
            "http_errors": http_errors, "good_rows": good_rows, "errors_on_good_rows": good_errors,
            "bad_rows": bad_rows, "bad_rows_with_error": bad_answered, "errors_by_kind": errors,
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None}


def memory(load: Load, n_requests: int, window: int = 1000) -> dict:
    samples = load.rss_by_request
    first = [rss for done, rss in samples if done <= window]
    last = [rss for done, rss in samples if n_requests - window <= done <= n_requests]
    mb = 1 / 2**20
    return {"peak_rss_mb": round(max(r for _, r in samples) * mb, 1) if samples else None,
            "first_1000_peak_mb": round(max(first) * mb, 1) if first else None,
            "last_1000_peak_mb": round(max(last) * mb, 1) if last else None}


def test_images(prepared: Path, n: int = 256) -> list[bytes]:
    from mofe_ood.images import encode_png
    from mofe_ood.splits import load_split

    if not (prepared / "manifest.json").is_file():
        raise SystemExit(f"{prepared} has no prepared benchmark: run `make run` first")
    return [encode_png(image) for image in load_split(prepared, "test").images[:n]]


def hostile_client(port: int, bodies: list, stop: threading.Event, out: list, offset: int) -> None:
    """Send `bodies` in a loop (starting at `offset`) until `stop`; record (name, status, right?)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = offset
    while not stop.is_set():
        name, body, want = bodies[i % len(bodies)]
        i += 1
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        if isinstance(want, int):
            right = response.status == want and b"params.batch_size" in payload and b"stack_trace" not in payload
        else:
            rows = json.loads(payload)["predictions"] if response.status == 200 else []
            right = len(rows) == len(want) and all(
                (row["error"] is None and row["ood_score"] is not None) if w is None
                else (row["error"] or "").startswith(w) and row["ood_score"] is None for row, w in zip(rows, want))
        out.append((name, response.status, right))
    conn.close()


def hostile(args, images: list[bytes], port: int, load: Load) -> dict:
    """Good single-image requests alone, then beside hostile clients: their latency, the answers' correctness."""
    import tempfile

    import yaml

    max_rows = yaml.safe_load(Path(args.params).read_text())["serve"]["max_rows"]
    with tempfile.TemporaryDirectory(prefix="mofe-hostile-") as tmp:
        bodies = hostile_bodies(images, max_rows, Path(tmp))
        alone = run_phase(load, plan(images, args.requests, 1, 0), args.clients, args.timeout)
        peak_alone = memory(load, load.done)["peak_rss_mb"]
        stop, answers = threading.Event(), []
        threads = [threading.Thread(target=hostile_client, args=(port, bodies, stop, answers, i))
                   for i in range(args.hostile_clients)]
        for t in threads:
            t.start()
        beside = run_phase(load, plan(images, args.requests, 1, 0, start=3), args.clients, args.timeout)
        stop.set()
        for t in threads:
            t.join()
    kinds: dict[str, dict] = {}
    for name, status, right in answers:
        entry = kinds.setdefault(name, {"requests": 0, "wrong": 0, "statuses": set()})
        entry["requests"] += 1
        entry["wrong"] += not right
        entry["statuses"].add(status)
    for entry in kinds.values():
        entry["statuses"] = sorted(entry["statuses"])
    keep = ("requests", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "http_errors", "errors_on_good_rows")
    return {"good_alone": {k: alone[k] for k in keep}, "good_beside_hostile": {k: beside[k] for k in keep},
            "hostile": kinds, "peak_rss_mb": {"good_alone": peak_alone,
                                              "overall": memory(load, load.done)["peak_rss_mb"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/mofe-ood@champion")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000, help="single-image requests in all")
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument("--batches", type=int, default=25, help="batch requests per batch client")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bad-every", type=int, default=20, help="every Nth row is bad (0: none)")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--timeout", type=float, default=900, help="seconds at most per phase")
    parser.add_argument("--hostile", action="store_true", help="good requests beside hostile clients (issue 19)")
    parser.add_argument("--hostile-clients", type=int, default=2)
    parser.add_argument("--params", default="params.yaml", help="--hostile: where serve.max_rows is read")
    args = parser.parse_args(argv)

    from mofe_ood.registry.tracking import tracking_uri

    images = test_images(Path(args.prepared))
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mofe-bench-serve-{port}.log"
    env = {"MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    server = start_server(args.model, port, log_path, env)
    print(f"server up in {time.perf_counter() - started:.1f} s (pid {server.pid}, port {port}, log {log_path})")
    load = Load(port, server.pid)
    sampler = threading.Thread(target=load.sample_memory, daemon=True)
    sampler.start()
    if args.hostile:
        try:
            report = hostile(args, images, port, load)
        finally:
            load.stop_sampling.set()
            stop_server(server)
        print(json.dumps({"model": args.model, "clients": args.clients,
                          "hostile_clients": args.hostile_clients, **report}, indent=2))
        good = all(report[p]["http_errors"] == 0 and report[p]["errors_on_good_rows"] == 0
                   for p in ("good_alone", "good_beside_hostile"))
        return 0 if good and all(k["wrong"] == 0 for k in report["hostile"].values()) else 1
    try:
        singles = run_phase(load, plan(images, args.requests, 1, args.bad_every), args.clients, args.timeout)
        mem = memory(load, singles["requests"])
        batches = run_phase(load, plan(images, args.batches * args.batch_clients, args.batch_size,
                                       args.bad_every, start=7), args.batch_clients, args.timeout)
    finally:
        load.stop_sampling.set()
        stop_server(server)
    mem["peak_rss_mb"] = memory(load, load.done)["peak_rss_mb"]
    report = {"model": args.model, "torch_threads": os.environ.get("MOFE_SERVE_THREADS", "default"),
              "single": {"clients": args.clients, **singles}, "batch": {"clients": args.batch_clients,
                                                                        "rows": args.batch_size, **batches},
              "memory": mem}
    print(json.dumps(report, indent=2))
    good = all(p["errors_on_good_rows"] == 0 and p["http_errors"] == 0 and p["bad_rows_with_error"] == p["bad_rows"]
               for p in (singles, batches))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
