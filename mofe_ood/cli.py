"""`mofe`: one entry point per pipeline stage (what dvc.yaml runs) plus the user commands.

Stage modules are imported only when their command runs: importing torch, kfp,
mlflow and dvc together costs ~10 s, which `mofe --help` should not pay.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import yaml

# command -> (module, help). Each stage module has run(params, ...) with default paths.
STAGES = {
    "prepare": ("mofe_ood.prepare", "build the ID splits and OOD sets under data/prepared"),
    "extract": ("mofe_ood.extract", "frozen-backbone features under data/features"),
    "train": ("mofe_ood.train", "train the heads (linear, mlp, mofe, mofe_dynmix) into models/"),
    "evaluate": ("mofe_ood.evaluate", "every variant x OOD score x OOD set into reports/"),
    "register": ("mofe_ood.register", "log the run to MLflow and register the model behind the promotion gate"),
}
# User commands (not pipeline stages): name -> help; arguments in add_user_commands.
USER_COMMANDS = {
    "score": "classify images and flag OOD ones (one JSON line per image, or CSV with --out)",
    "promote": "move the registry's `champion` alias to a model version (same gate as register)",
    "validate": "check every params section at once, naming every bad key (the Kubeflow run's first step)",
    "push-raw": "copy raw data to S3 for container steps (default: Fashion-MNIST's files to "
                "s3://$S3_BUCKET/raw/fashion-mnist)",
}


def parse_set(items: list[str]) -> dict:
    """`--set a.b=1` pairs -> a nested override dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mofe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a param for this run only (repeatable)")
    add_user_commands(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from mofe_ood import params as params_mod

    try:
        params = params_mod.merged(load_params(args.params, args.command), parse_set(args.set))
        if args.command in USER_COMMANDS:
            return {"score": score, "promote": promote, "push-raw": push_raw,
                    "validate": validate}[args.command](args, params)
        module = importlib.import_module(STAGES[args.command][0])
        result = module.run(params)
    except (params_mod.ParamError, FileNotFoundError, ConnectionError, ValueError) as err:
        # Bad input is the user's to fix: one clear line, no stack trace.
        print(f"mofe {args.command}: error: {err}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in (result or {}).items() if k != "splits"}
    if isinstance(result, dict) and "splits" in result:
        summary["splits"] = {k: v.get("count") for k, v in result["splits"].items()}
    print(json.dumps(summary, default=str))
    return 0


def load_params(path: str, command: str) -> dict:
    """The params file; `mofe score` also runs outside a project, without one."""
    from mofe_ood import params as params_mod

    if command == "score" and path == "params.yaml" and not Path(path).is_file():
        return {}
    return params_mod.load(path)


def add_user_commands(commands) -> None:
    for name, help_text in USER_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a param for this run only (repeatable)")
        if name == "score":
            sub.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursive)")
            sub.add_argument("--model", default="models:/mofe-ood@champion",
                             help="registry URI (default: models:/mofe-ood@champion, tracking URI from "
                                  "$MLFLOW_TRACKING_URI or ./mlflow.db), a models/<variant> folder "
                                  "(with data/features and reports of the pipeline) or a detector bundle")
            sub.add_argument("--out", help="write CSV here instead of JSON lines on stdout")
            sub.add_argument("--batch-size", type=int, default=64)
            sub.add_argument("--stats", action="store_true", help="print images/s on stderr")
        elif name == "push-raw":
            sub.add_argument("--src", help="a file or folder (default: Fashion-MNIST's folder, "
                                           "prepare.fashion_mnist_dir or $FASHION_MNIST_DIR)")
            sub.add_argument("--to", help="s3://BUCKET/PREFIX (default: s3://$S3_BUCKET/raw/fashion-mnist)")
        elif name == "promote":
            sub.add_argument("--version", required=True, type=int, help="model version to promote")
            sub.add_argument("--force", action="store_true", help="promote even if the gate says no")


def score(args, params: dict) -> int:
    """`mofe score`: records on stdout (or CSV), unreadable files on stderr; the batch goes on."""
    import csv
    import time

    from mofe_ood.images import list_images
    from mofe_ood.serving.bundle import load_detector
    from mofe_ood.serving.detector import score_files

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: {args.batch_size} must be >= 1")
    started = time.perf_counter()
    paths = list_images(args.paths)
    if not paths:
        raise FileNotFoundError(f"no image files in {' '.join(args.paths)}")
    detector = load_detector(args.model, params=params)
    loaded = time.perf_counter()
    fields = ["path", "class", "probability", "ood_score", "is_ood", "error"]
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.DictWriter(out, fieldnames=fields) if args.out else None
        if writer:
            writer.writeheader()

        def emit(path, record: dict) -> None:
            if record["error"] is not None:
                print(f"mofe score: {path}: {record['error']}", file=sys.stderr)
            row = {"path": str(path), **record}
            if writer:
                writer.writerow(row)
            else:
                if row["error"] is None:
                    del row["error"]
                else:
                    row = {"path": row["path"], "error": row["error"]}
                out.write(json.dumps(row) + "\n")

        scored, failed = score_files(detector, paths, emit, args.batch_size)
    finally:
        if args.out:
            out.close()
    seconds = time.perf_counter() - loaded
    if args.stats or failed:
        print(f"mofe score: {scored} images scored, {failed} unreadable", file=sys.stderr)
    if args.stats:
        print(f"mofe score: {seconds:.2f} s, {scored / max(seconds, 1e-9):.1f} images/s "
              f"(model loaded in {loaded - started:.1f} s)", file=sys.stderr)
    return 0 if scored else 1


def validate(args, params: dict) -> int:
    from mofe_ood import validate as check

    print(json.dumps(check.run(params)))
    return 0


def push_raw(args, params: dict) -> int:
    """`mofe push-raw`: what a container step reads instead of a host folder (see prepare.py)."""
    import os

    from mofe_ood import storage

    src = args.src or (params.get("prepare") or {}).get("fashion_mnist_dir") or os.environ.get(
        "FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    if not Path(src).exists():
        raise FileNotFoundError(f"--src {src!r} does not exist")
    settings = storage.check_s3()
    uri = args.to or f"s3://{settings.bucket}/raw/fashion-mnist"
    storage.split_s3(uri)
    keys = storage.upload(src, uri)
    print(json.dumps({"uri": uri, "objects": len(keys), "from": str(src)}))
    return 0


def promote(args, params: dict) -> int:
    from mofe_ood.register import promote as promote_version

    print(json.dumps(promote_version(params, args.version, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
