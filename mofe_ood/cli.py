"""`mofe`: one entry point per pipeline stage (what dvc.yaml runs) plus the user commands.

Stage modules are imported only when their command runs: importing torch, kfp,
mlflow and dvc together costs ~10 s, which `mofe --help` should not pay.

Errors: bad input (a `UserError`, a missing file, a server that does not answer) is the
user's to fix and prints one line, exit status 2; anything else is a bug and keeps its
traceback. With `-v`, every error shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import yaml

from mofe_ood import stages
from mofe_ood.errors import UserError
from mofe_ood.params import ParamError, load, merged

# What a user can fix: bad params, values or images, a missing file, a server that is down.
USER_ERRORS = (UserError, FileNotFoundError, ConnectionError)
# User commands (not pipeline stages): name -> help; arguments in add_user_commands.
USER_COMMANDS = {
    "score": "classify images and flag OOD ones (one JSON line per image, or CSV with --out)",
    "promote": "move the registry's `champion` alias to a model version (same gate as register)",
    "registry": "list the registered model's versions: aliases, gate value, decision and reason, run, commit",
    "validate": "check every params section at once, naming every bad key (the Kubeflow run's first step)",
    "params": "print the params a run would use (a preset merged onto params.yaml, plus --set) as YAML",
    "push-raw": "copy raw data to S3 for container steps (default: Fashion-MNIST's files to "
                "s3://$S3_BUCKET/raw/fashion-mnist)",
}


def parse_set(items: list[str]) -> dict:
    """`--set a.b=1` pairs -> a nested override dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def add_params_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--params", default="params.yaml",
                     help="params file or preset, e.g. presets/full.yaml (default: params.yaml)")
    sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a param for this run only (repeatable)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mofe", description=__doc__.splitlines()[0])
    top.add_argument("-v", "--verbose", action="store_true", help="log progress; tracebacks for every error")
    commands = top.add_subparsers(dest="command", required=True)
    for stage in stages.STAGES:
        add_params_args(commands.add_parser(stage.name, help=stage.help))
    add_user_commands(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return command(args)
    except USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
        from mofe_ood.images import escaped  # messages quote user paths: one line each, whatever their names

        lines = getattr(err, "lines", None) or [err]  # an error listing problems: each escaped on its line
        print(f"mofe {args.command}: error: " + "\n".join(map(escaped, lines)), file=sys.stderr)
        return 2


def command(args: argparse.Namespace) -> int:
    params = merged(load_params(args.params, args.command), parse_set(args.set))
    if args.command in USER_COMMANDS:
        return {"score": score, "promote": promote, "push-raw": push_raw, "validate": validate,
                "params": show_params, "registry": registry}[args.command](args, params)
    module = stages.get(args.command).load()
    result = module.run(params)
    if hasattr(module, "summary"):  # a stage whose result is too long for a terminal says it shorter
        print(module.summary(result, params))
        return 0
    summary = {k: v for k, v in (result or {}).items() if k != "splits"}
    if isinstance(result, dict) and "splits" in result:
        summary["splits"] = {k: v.get("count") for k, v in result["splits"].items()}
    print(json.dumps(summary, default=str))
    return 0


def load_params(path: str, command: str) -> dict:
    """The params file; `mofe score` and `mofe registry` also run outside a project, without one."""
    if command in ("score", "registry") and path == "params.yaml" and not Path(path).is_file():
        return {}
    return load(path)


def add_user_commands(commands) -> None:
    for name, help_text in USER_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        add_params_args(sub)
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
        elif name == "registry":
            sub.add_argument("--name", help="registered model (default: register.model_name, else mofe-ood)")
            sub.add_argument("--json", action="store_true", help="one JSON list of versions instead of a table")
        elif name == "promote":
            sub.add_argument("--version", required=True, type=int, help="model version to promote")
            sub.add_argument("--force", action="store_true", help="promote even if the gate says no")
        elif name == "params":
            sub.add_argument("--out", help="write the YAML here (e.g. params.yaml, for dvc repro) "
                                           "instead of stdout")


def score(args, params: dict) -> int:
    """`mofe score`: records on stdout (or CSV), unreadable files on stderr; the batch goes on."""
    import csv
    import time

    import torch

    from mofe_ood.images import escaped, list_images
    from mofe_ood.serving.bundle import load_detector
    from mofe_ood.serving.detector import score_files
    from mofe_ood.serving.runtime import leave_cores_to

    if args.batch_size < 1:
        raise UserError(f"--batch-size: {args.batch_size} must be >= 1")
    started = time.perf_counter()
    paths = list_images(args.paths)
    skipped = skipped_files(args.paths, paths)
    if not paths:
        raise FileNotFoundError(f"no image files in {' '.join(map(escaped, args.paths))}" + (
            f" ({len(skipped)} other files: {skip_reasons(skipped)})" if skipped else ""))
    version = registry_version(args.model)  # before the download: a wrong reference is one line
    detector = load_detector(args.model, params=params)
    print(f"mofe score: model {escaped(model_named(args.model, version, detector))}", file=sys.stderr)
    threads = leave_cores_to(detector.session)
    loaded = time.perf_counter()
    fields = ["path", "class", "probability", "ood_score", "is_ood", "error"]
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.DictWriter(out, fieldnames=fields) if args.out else None
        if writer:
            writer.writeheader()

        def emit(path, record: dict) -> None:
            if record["error"] is not None:
                print(f"mofe score: {escaped(path)}: {record['error']}", file=sys.stderr)  # one line per file
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
        torch.set_num_threads(threads)  # as it was: `mofe score` may run inside a longer process
    seconds = time.perf_counter() - loaded
    print(f"mofe score: {scored} images scored, {failed} unreadable, {len(skipped)} skipped"
          + (f" ({skip_reasons(skipped)}{'' if args.verbose else '; -v names them'})" if skipped else ""),
          file=sys.stderr)
    for path in skipped if args.verbose else ():
        print(f"mofe score: skipped {escaped(path)}: {skip_reason(path)}", file=sys.stderr)
    if args.out:
        print(f"mofe score: wrote {scored + failed} rows ({', '.join(fields)}) to {escaped(args.out)}", file=sys.stderr)
    if args.stats:
        print(f"mofe score: {seconds:.2f} s, {scored / max(seconds, 1e-9):.1f} images/s "
              f"(model loaded in {loaded - started:.1f} s)", file=sys.stderr)
    return 0 if scored else 1


def skipped_files(args_paths: list[str], kept: list[Path]) -> list[Path]:
    """Files inside the named folders that list_images leaves out (named files are never skipped)."""
    kept_set = set(kept)
    return sorted(f for p in map(Path, args_paths) if p.is_dir() for f in p.rglob("*")
                  if f.is_file() and f not in kept_set)


def skip_reason(path: Path) -> str:
    from mofe_ood.images import IMAGE_SUFFIXES

    if path.name.startswith("."):
        return "hidden file"
    return f"not an image file name ({', '.join(sorted(IMAGE_SUFFIXES))})"


def skip_reasons(skipped: list[Path]) -> str:
    """`3 not image files by name, 1 hidden`: how many were skipped for each reason."""
    hidden = sum(p.name.startswith(".") for p in skipped)
    parts = [f"{len(skipped) - hidden} not image files by name" if len(skipped) > hidden else "",
             f"{hidden} hidden" if hidden else ""]
    return ", ".join(p for p in parts if p)


def registry_version(model: str) -> dict | None:
    """{name, version, alias} of a `models:/` reference, checked against the registry; None otherwise."""
    if not model.startswith("models:/"):
        return None
    from mofe_ood.registry.tracking import connect
    from mofe_ood.registry.versions import resolve

    return resolve(connect(must_exist=True), model)


def model_named(model: str, version: dict | None, detector) -> str:
    """What `mofe score` ran: the reference, the version it resolved to, the variant, score and threshold."""
    spec = detector.score_spec
    which = f"{model} (version {version['version']})" if version else model
    tpr = f" at {spec['tpr']:.0%} ID TPR" if spec.get("tpr") else ""
    return (f"{which}: variant {detector.variant}, score {spec['name']}, "
            f"threshold {detector.threshold:.6g}{tpr} (is_ood: ood_score below it)")


def registry(args, params: dict) -> int:
    """`mofe registry`: the versions as the gate left them (MLflow's UI buttons skip the gate)."""
    from mofe_ood.registry.tracking import connect
    from mofe_ood.registry.versions import table, versions

    name = args.name or (params.get("register") or {}).get("model_name") or "mofe-ood"
    rows = versions(connect(must_exist=True), name)
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else table(name, rows))
    return 0


def validate(args, params: dict) -> int:
    from mofe_ood import validate as check

    print(json.dumps(check.run(params)))
    return 0


def show_params(args, params: dict) -> int:
    """`mofe params`: the merged params as one file, for tools that read params.yaml only (dvc)."""
    from mofe_ood import validate as check

    check.run(params)  # never write params a stage would refuse
    text = yaml.safe_dump(params, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def push_raw(args, params: dict) -> int:
    """`mofe push-raw`: what a container step reads instead of a host folder (see prepare.py)."""
    import os

    from mofe_ood import storage

    src = args.src or params["prepare"]["fashion_mnist_dir"] or os.environ.get(
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
